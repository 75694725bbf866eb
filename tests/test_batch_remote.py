"""`cpuflow batch --ray ray://HOST:PORT` through the Ray Client, and models fetched by the workers
from an http:// URI, on loopback only: a Ray head started here (`ray start --head` bound to
127.0.0.1 with its Ray Client server), and a model archive served by a local http.server thread.
The head's node cache is its own folder (not the driver's), so a model found there came to the
node through Ray (the object store) or the URI. Skips only when the Ray Client cannot run here."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import pytest
from click.testing import CliRunner
from helpers_batch import PROMPTS, generate_reference, journal, pixels, write_jobs

import cpuflow.batch
from cpuflow.image import read_png_metadata

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"     # Ray's single-machine mode: loopback addresses
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cpuflow[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc, timeout: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def _client_server_logs(temp_dir: str, chars: int = 1500) -> str:
    """The tails of the head's Ray Client server logs (what a failed connection left)."""
    import glob
    out = []
    for path in sorted(glob.glob(os.path.join(temp_dir, "session_*", "logs", "ray_client_server*"))):
        with open(path, errors="replace") as f:
            tail = f.read()[-chars:]
        if tail.strip():
            out.append(f"--- {os.path.basename(path)}\n{tail}")
    return "\n".join(out) or "(no Ray Client server logs)"


@pytest.fixture(scope="module")
def ray_client_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with its Ray Client server; yields (ray:// address, node cache folder)."""
    try:
        import grpc  # noqa: F401  (the Ray Client speaks gRPC: `pip install 'ray[client]'`)
    except ImportError:
        pytest.skip("the Ray Client needs grpcio, which is not installed (pip install 'ray[client]')")
    if ray.is_initialized():
        ray.shutdown()
    node_cache = tmp_path_factory.mktemp("ray-client-node-cache")
    temp_dir = tempfile.mkdtemp(prefix="cfray-")      # short: Ray's unix socket paths must fit 107 bytes
    client_port = _free_port()
    log_path = os.path.join(temp_dir, "head.log")
    env = dict(os.environ,
               CPUFLOW_CACHE_DIR=str(node_cache),     # the workers' node cache: never the driver's or the user's
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",     # stop at once at the end, no 30 s node drain
               # a loopback-only test cluster: no token authentication (Ray turns it on when ~/.ray/auth_token
               # exists; a real cluster that uses it needs RAY_AUTH_MODE=token on the driver, as Ray documents)
               RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={_free_port()}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={_free_port()}", "--include-dashboard=false", "--num-cpus=2",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log_path, "w") as log:
        # its own process group: the head and every process it starts are stopped together, and only they
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        if not _wait_for_port(client_port, head, timeout=120):
            with open(log_path, errors="replace") as f:
                tail = f.read()[-1500:]
            pytest.skip(f"the Ray head with a Ray Client server did not start here: {tail}")
        address = f"ray://127.0.0.1:{client_port}"
        # the client port opens before the head's node is ready: connect once (with the product's
        # retries) before any test does, and show the client server's logs if that fails
        from cpuflow.batch.ray_pool import connect
        try:
            connect(ray, address, attempts=6)
        except Exception as e:
            pytest.fail(f"the Ray Client cannot connect to a fresh head: {e}\n{_client_server_logs(temp_dir)}")
        finally:
            if ray.is_initialized():
                ray.shutdown()
        yield address, node_cache
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over http://127.0.0.1:PORT/ by a thread; yields (folder, base URL, request paths)."""
    root = tmp_path / "www"
    root.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(root)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_cli_batch_through_the_ray_client(ray_client_head, tmp_path):
    from cpuflow.batch.model_transfer import manifest_sha256
    from cpuflow.cli import main
    from cpuflow.pipelines.model import shipped_model_dir
    address, node_cache = ray_client_head
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:1], [0, 1, 2, 3])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(out), "--ray", address, "--threads", "1",
                                  "--model-transfer", "ship", "-q"])
    assert r.exit_code == 0, r.output
    # --workers auto on Ray: the cluster's 2 CPUs / 1 CPU per worker
    assert "4 image(s) written" in r.output and "2 worker(s)" in r.output and "all 4 job(s) finished" in r.output, \
        r.output
    assert not ray.is_initialized()                 # the command disconnected from the cluster
    files = list((out / "images").glob("*.png"))
    assert len(files) == 4 and len(journal(out)) == 4, (files, journal(out))
    ref = generate_reference(tmp_path, PROMPTS[0], [0, 1, 2, 3])
    for f in files:
        assert (pixels(f) == ref[read_png_metadata(f)["seed"]]).all()     # bit-identical to `cpuflow generate`
    # the model reached the node through the object store, into the node's own cache
    assert (node_cache / "models" / manifest_sha256(shipped_model_dir()) / "cpuflow.json").is_file()


def test_http_model_uri_is_fetched_verified_and_a_tampered_file_refused(ray_client_head, http_folder, tmp_path):
    from cpuflow.batch.model_transfer import manifest_sha256
    from cpuflow.manifest import load_manifest
    from cpuflow.pipelines.model import shipped_model_dir
    address, node_cache = ray_client_head
    www, base, seen = http_folder
    sha = manifest_sha256(shipped_model_dir())
    with tarfile.open(www / "model.tar", "w") as tar:
        tar.add(shipped_model_dir(), arcname="default")
    # the same export with one weight file changed by a byte: same manifest, same sizes, another sha256
    bad = tmp_path / "bad"
    shutil.copytree(shipped_model_dir(), bad)
    weights = max((rel for rel in load_manifest(bad, verify=False).files if rel.endswith(".bin")),
                  key=lambda rel: (bad / rel).stat().st_size)
    data = bytearray((bad / weights).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / weights).write_bytes(bytes(data))
    with tarfile.open(www / "bad.tar", "w") as tar:
        tar.add(bad, arcname="default")
    shutil.rmtree(node_cache / "models" / sha, ignore_errors=True)      # the node has no copy yet

    ray.init(address)        # one connection for both runs (the CLI test covers connecting)
    try:
        with pytest.raises(cpuflow.errors.IntegrityError, match="does not match its sha256"):
            cpuflow.batch.run(write_jobs(tmp_path / "a.jsonl", PROMPTS[:1], [0]), out=tmp_path / "out-bad",
                              ray=address, workers=1, threads=1, model_uri=f"{base}/bad.tar")
        assert "/bad.tar" in seen                                        # the worker did fetch it
        assert not (node_cache / "models" / sha).exists()                # and kept nothing of it
        assert not [p for p in (node_cache / "models").iterdir() if "staging" in p.name]
        assert not (tmp_path / "out-bad" / "images").exists() or not any((tmp_path / "out-bad" / "images").iterdir())

        workers = []
        s = cpuflow.batch.run(write_jobs(tmp_path / "b.jsonl", PROMPTS[:1], [0, 1]), out=tmp_path / "out",
                              ray=address, workers=1, threads=1, model_uri=f"{base}/model.tar",
                              progress=lambda ev: workers.append(ev) if ev["event"] == "worker" else None)
    finally:
        ray.shutdown()
    assert (s.written, s.failed) == (2, 0), s
    assert "/model.tar" in seen
    assert workers[0]["path"] == str(node_cache / "models" / sha) and workers[0]["shipped"]
    ref = generate_reference(tmp_path, PROMPTS[0], [0, 1])
    for f in (tmp_path / "out" / "images").glob("*.png"):
        assert (pixels(f) == ref[read_png_metadata(f)["seed"]]).all()


def test_ray_client_missing_is_one_line(tmp_path, monkeypatch):
    from cpuflow.cli import main
    monkeypatch.setitem(sys.modules, "grpc", None)     # import grpc -> ImportError: Ray without its client extra
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:1], [1])
    r = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", "ray://127.0.0.1:1"])
    assert r.exit_code == 4
    assert r.output.strip() == ("error: --ray ray://... connects through the Ray Client, which needs grpcio "
                                "(pip install 'cpuflow[ray]')")
    assert not (tmp_path / "out").exists()


class _FakeRay:
    """ray.init that fails the first ``failures`` times with ``message``."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.calls, self.initialized = failures, message, 0, False

    def init(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(self.message)
        self.initialized = True

    def is_initialized(self):
        return self.initialized

    def shutdown(self):
        self.initialized = False


def test_a_client_server_that_failed_to_start_is_retried():
    from cpuflow.batch.ray_pool import connect
    fake, waits = _FakeRay(2, "Initialization failure from server: RuntimeError: Starting Ray client server "
                              "failed. See ray_client_server_23000.err"), []
    connect(fake, "ray://127.0.0.1:1", sleep=waits.append)
    assert fake.calls == 3 and fake.initialized and waits == [2.0, 4.0]


def test_an_unreachable_cluster_is_not_retried_and_says_how_often_it_tried():
    from cpuflow.batch.ray_pool import connect
    from cpuflow.errors import CpuflowError
    fake, waits = _FakeRay(1, "ray client connection timeout"), []
    with pytest.raises(CpuflowError, match=r"cannot reach the Ray cluster at ray://127.0.0.1:1: ray client") as e:
        connect(fake, "ray://127.0.0.1:1", sleep=waits.append)
    assert fake.calls == 1 and waits == [] and "--ray-client-server-port" in e.value.hint
    fake = _FakeRay(9, "Starting Ray client server failed.")
    with pytest.raises(CpuflowError, match=r"\(tried 3 times\)"):
        connect(fake, "ray://127.0.0.1:1", sleep=waits.append)
    assert fake.calls == 3
