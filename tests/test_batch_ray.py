"""`cpuflow batch --ray` on a real Ray cluster started here, on 127.0.0.1 only: 40 jobs of
the shipped model on two actors, the model shipped through the object store into the node
cache, one worker process killed mid-run (SIGKILL), every image bit-identical to
`cpuflow generate`'s, no duplicates, the journal complete. Skips only when Ray cannot start."""
from __future__ import annotations

import json
import os
import signal

import pytest
from helpers_batch import PROMPTS, generate_reference, journal, pixels, write_jobs

import cpuflow.batch
from cpuflow.image import read_png_metadata

# Ray's "single machine" mode (read when ray is imported): every address it binds and
# advertises is the loopback one. Only Ray reads this variable.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cpuflow[ray]')")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("CPUFLOW_CACHE_DIR",)}
    # the workers inherit this at start: their node cache is the test's, never the user's
    os.environ["CPUFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("ray-node-cache"))
    # ray.init installs its own SIGTERM handler in this (the test session's) process and leaves it
    # after ray.shutdown: put the session's back, or later forked children cannot be terminated
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    except Exception as e:      # pragma: no cover - a machine where Ray cannot start
        pytest.skip(f"Ray cannot start here: {type(e).__name__}: {e}")
    try:
        assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
        yield os.environ["CPUFLOW_CACHE_DIR"]
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_forty_jobs_on_two_actors_survive_a_killed_worker(local_ray, tmp_path):
    seeds = list(range(10))
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS, seeds,
                      extra_lines=['{"prompt": "x", "seed": 1, "sampler": "nope"}'])   # bad input: fails alone
    workers, events, killed = {}, [], []

    def progress(ev):
        events.append(ev)
        if ev["event"] == "worker":
            workers[ev["pid"]] = ev
        if ev["event"] == "image" and sum(e["event"] == "image" for e in events) == 6 and not killed:
            pid = next(iter(workers))
            os.kill(pid, signal.SIGKILL)          # a worker process dies with jobs queued on it
            killed.append(pid)

    out = tmp_path / "out"
    s = cpuflow.batch.run(jobs, out=out, ray="auto", workers=2, cpus_per_worker=1, threads=1,
                          model_transfer="ship", progress=progress)
    assert killed and any(e["event"] == "requeued" for e in events), events
    assert len(workers) == 3                                   # two, then one replacement
    assert all(w["shipped"] for w in workers.values())         # the model came through the object store
    assert (s.written, s.failed, s.total) == (40, 1, 41), s
    assert "sampler must be one of" in s.errors[0][1]

    entries = journal(out)
    assert len(entries) == 41 and len({e["id"] for e in entries}) == 41          # complete, no duplicates
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 41 and len({r["id"] for r in results}) == 41
    assert {r["worker"] for r in results if r["status"] == "done"} >= {w["worker"] for w in workers.values()
                                                                          if w["pid"] not in killed}
    files = list((out / "images").glob("*.png"))
    assert len(files) == 40
    got = {}
    for f in files:
        meta = read_png_metadata(f)
        got[(meta["prompt"], meta["seed"])] = pixels(f)
    for prompt in PROMPTS:
        for seed, want in generate_reference(tmp_path, prompt, seeds).items():
            assert (got[(prompt, seed)] == want).all(), (prompt, seed)       # bit-identical pixels
    # the shipped copy sits in the node cache, named by the manifest's sha256
    from cpuflow.batch.model_transfer import manifest_sha256
    from cpuflow.pipelines.model import shipped_model_dir
    cached = os.path.join(local_ray, "models", manifest_sha256(shipped_model_dir()))
    assert os.path.isfile(os.path.join(cached, "cpuflow.json"))


def test_ctrl_c_then_the_cli_finishes_then_a_model_uri(local_ray, tmp_path):
    import shutil
    import tarfile

    from click.testing import CliRunner

    from cpuflow.batch.model_transfer import manifest_sha256
    from cpuflow.cli import main
    from cpuflow.pipelines.model import shipped_model_dir
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:1], [0, 1, 2, 3])
    out = tmp_path / "out"

    def ctrl_c(ev):           # Ctrl-C on the driver, as its second image is committed
        if ev["event"] == "image" and len(journal(out)) == 2:
            raise KeyboardInterrupt

    s = cpuflow.batch.run(jobs, out=out, ray="auto", workers=1, threads=1, progress=ctrl_c)
    assert s.interrupted and s.written == 2 and "stopped:" in s.line() and "2 left of 4" in s.line()
    # the command finishes the rest (on the Ray already initialised in this process)
    r = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(out), "--ray", "auto", "--workers", "1",
                                  "--threads", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert "2 image(s) written" in r.output and "2 already done" in r.output and "1 worker(s)" in r.output
    ref = generate_reference(tmp_path, PROMPTS[0], [0, 1, 2, 3])
    files = list((out / "images").glob("*.png"))
    assert len(files) == 4
    for f in files:
        assert (pixels(f) == ref[read_png_metadata(f)["seed"]]).all()
    assert CliRunner().invoke(main, ["batch", str(jobs), "--out", str(out), "--ray", "auto"]).exit_code == 0
    assert len(journal(out)) == 4 and len({e["id"] for e in journal(out)}) == 4     # nothing made twice

    # a node that fetches a tar of the folder from a URI into its (emptied) cache
    sha = manifest_sha256(shipped_model_dir())
    shutil.rmtree(os.path.join(local_ray, "models", sha), ignore_errors=True)
    with tarfile.open(tmp_path / "model.tar", "w") as tar:
        tar.add(shipped_model_dir(), arcname="default")
    seen = []
    s = cpuflow.batch.run(write_jobs(tmp_path / "more.jsonl", PROMPTS[:1], [2]), out=tmp_path / "out2",
                          ray="auto", workers=1, threads=1, model_uri=(tmp_path / "model.tar").as_uri(),
                          progress=lambda ev: seen.append(ev) if ev["event"] == "worker" else None)
    assert s.written == 1
    assert seen[0]["path"] == os.path.join(local_ray, "models", sha)
    # an archive of another export is refused before anything runs
    other = tmp_path / "other"
    shutil.copytree(shipped_model_dir(), other)
    (other / "cpuflow.json").write_text((other / "cpuflow.json").read_text().replace("{", "{ ", 1))
    shutil.rmtree(os.path.join(local_ray, "models", sha), ignore_errors=True)
    with tarfile.open(tmp_path / "other.tar", "w") as tar:
        tar.add(other, arcname="default")
    with pytest.raises(cpuflow.errors.IntegrityError, match="not the driver's"):
        cpuflow.batch.run(write_jobs(tmp_path / "x.jsonl", PROMPTS[:1], [3]), out=tmp_path / "out3", ray="auto",
                          workers=1, threads=1, model_uri=(tmp_path / "other.tar").as_uri())
