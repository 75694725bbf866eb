"""`cpuflow serve` as a process, with the shipped model: it says "open ..." only
once it listens (issue 17 item 11), and it stays healthy under a mixed load
from concurrent clients (the soak, issue 17 item 13).

The soak runs CPUFLOW_SOAK_JOBS jobs (default 24, about a minute; bench/README.md
has the 500-job run) from 4 client threads: sizes, samplers, guidance <= 1 and
> 1, img2img and cancels drawn at random (seeded). Every answer must be below
500, every finished job's images must decode, and the server's RSS at the end
must be within 10% of its RSS after the first 50 jobs (a third of a shorter run;
a warm-up of every size x guidance branch x task comes first, so each compiled
shape exists before the baseline)."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from cpuflow.pipelines.model import shipped_model_dir

pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.skipif(not (shipped_model_dir() / "cpuflow.json").exists(),
                                reason="the shipped model is not built in this checkout")

SIZES = ((64, 64), (96, 64), (64, 96))
GUIDANCE_LOW, GUIDANCE_HIGH = (0.0, 1.0), (2.0, 5.0, 7.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(port: int, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """The server process and its stderr lines up to the "open" line (or its exit)."""
    p = subprocess.Popen([sys.executable, "-m", "cpuflow.cli", "serve", "--port", str(port), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("open "):
            break
    return p, lines


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(30)


class Answer:
    def __init__(self, method: str, path: str, status: int, headers: dict, content: bytes):
        self.method, self.path, self.status_code, self.headers, self.content = method, path, status, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Client:
    """A plain HTTP client (the standard library's): one connection, reopened when the server closed it."""

    def __init__(self, url: str, timeout: float = 120):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                return Answer(method, path, r.status, dict(r.getheaders()), r.read())
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(self, path: str, json: dict | None = None) -> Answer:
        return self.request("POST", path, json if json is not None else {})

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- item 11 ---------------------------------------------------------------------------------
def test_port_in_use_is_one_error_line_and_no_open_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p, lines = start_serve(port)
        rest = p.stderr.read()
        p.wait(120)
    out = "\n".join(lines) + rest
    assert p.returncode == 2, out
    assert not any(ln.startswith("open ") for ln in out.splitlines()), out
    assert out.strip().splitlines() == [out.strip()] and out.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "--port" in out


@pytest.fixture(scope="module")
def server():
    port = free_port()
    p, lines = start_serve(port, "--threads", "2", "--max-queue", "16")
    try:
        assert lines and lines[-1] == f"open http://127.0.0.1:{port}/", lines
        yield p, f"http://127.0.0.1:{port}"
    finally:
        stop(p)


def test_open_line_means_it_answers(server):
    _p, url = server
    # no retry: the address printed must answer at once
    assert Client(url, timeout=30).get("/api/models").status_code == 200


# --- item 13 ---------------------------------------------------------------------------------
def init_png(rng: random.Random, w: int, h: int) -> str:
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    img.paste(tuple(rng.randrange(256) for _ in range(3)), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def job_specs(n: int, seed: int = 0) -> list[dict]:
    """A warm-up covering every size x guidance branch x task, then random jobs."""
    from cpuflow.samplers import SAMPLERS
    rng = random.Random(seed)
    samplers = sorted(SAMPLERS)
    specs = []
    for (w, h) in SIZES:
        for guidance in (GUIDANCE_LOW[0], GUIDANCE_HIGH[1]):
            for img2img in (False, True):
                specs.append({"w": w, "h": h, "guidance": guidance, "img2img": img2img, "cancel": None})
    while len(specs) < n:
        w, h = rng.choice(SIZES)
        specs.append({"w": w, "h": h, "guidance": rng.choice(GUIDANCE_LOW + GUIDANCE_HIGH),
                      "img2img": rng.random() < 0.3,
                      "cancel": rng.uniform(0.0, 0.4) if rng.random() < 0.15 else None})
    for i, s in enumerate(specs):
        sampler = samplers[i % len(samplers)]
        s.update(seed=i, steps=rng.randint(2, 4), sampler=sampler, n_samples=1 + (rng.random() < 0.2),
                 strength=round(rng.uniform(0.5, 0.9), 2),   # >= 0.5: at least one step of 2
                 schedule=rng.choice(["default", "karras"]) if SAMPLERS[sampler].supports_karras else "default")
    return specs[:max(n, 0)] if n >= len(specs) else specs[:n]


class Soak:
    def __init__(self, url: str, pid: int, specs: list[dict], baseline_after: int):
        self.url, self.pid, self.specs = url, pid, specs
        self.baseline_after = baseline_after
        self.lock = threading.Lock()
        self.next = 0
        self.finished = 0
        self.statuses: dict[str, int] = {}
        self.server_errors: list[str] = []
        self.problems: list[str] = []
        self.images = 0
        self.rss_baseline: int | None = None

    def take(self) -> dict | None:
        with self.lock:
            if self.next >= len(self.specs):
                return None
            self.next += 1
            return self.specs[self.next - 1]

    def note(self, r) -> None:
        with self.lock:
            self.statuses[str(r.status_code)] = self.statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 500:
                self.server_errors.append(f"{r.method} {r.path}: {r.status_code} {r.text[:300]}")

    def client(self) -> None:
        c = Client(self.url)
        try:
            self.loop(c)
        finally:
            c.close()

    def loop(self, c: Client) -> None:
        while (spec := self.take()) is not None:
            try:
                self.run_one(c, spec)
            except Exception as e:  # noqa: BLE001 - reported, the other clients go on
                with self.lock:
                    self.problems.append(f"job {spec['seed']}: {type(e).__name__}: {e}")
            with self.lock:
                self.finished += 1
                if self.finished == self.baseline_after:
                    self.rss_baseline = rss_bytes(self.pid)
                if self.finished % 25 == 0:   # progress of a long run (-s shows it)
                    print(f"soak: {self.finished} jobs, {self.images} images, server RSS "
                          f"{rss_bytes(self.pid) / 2**20:.1f} MiB, statuses {self.statuses}", flush=True)

    def run_one(self, c: Client, spec: dict) -> None:
        rng = random.Random(spec["seed"])
        body = {"prompt": rng.choice(["a red circle on a blue background", "a green square on a white background",
                                      "a yellow triangle on a black background"]),
                "width": spec["w"], "height": spec["h"], "steps": spec["steps"], "sampler": spec["sampler"],
                "schedule": spec["schedule"], "guidance": spec["guidance"], "seed": spec["seed"],
                "n_samples": spec["n_samples"]}
        if spec["guidance"] > 1:
            body["negative_prompt"] = "blurry"
        if spec["img2img"]:
            body.update(init_image=init_png(rng, spec["w"], spec["h"]), strength=spec["strength"])
        while True:
            r = c.post("/api/generate", json=body)
            self.note(r)
            if r.status_code != 429:
                break
            time.sleep(min(float(r.headers.get("Retry-After", "1")), 2.0) * rng.uniform(0.2, 1.0))
        if r.status_code != 202:
            raise AssertionError(f"generate answered {r.status_code}: {r.text[:300]}")
        job_id = r.json()["id"]
        if spec["cancel"] is not None:
            time.sleep(spec["cancel"])
            r = c.post(f"/api/jobs/{job_id}/cancel")
            self.note(r)
            if r.status_code not in (200, 409):
                raise AssertionError(f"cancel answered {r.status_code}: {r.text[:300]}")
        deadline = time.time() + 600
        while True:
            r = c.get(f"/api/jobs/{job_id}")
            self.note(r)
            job = r.json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if time.time() > deadline:
                raise AssertionError(f"job stuck in {job['status']}")
            time.sleep(0.2)
        if job["status"] == "failed":
            raise AssertionError(f"job failed: {job.get('error')}")
        if job["status"] == "cancelled":
            if spec["cancel"] is None:
                raise AssertionError("cancelled without a cancel")
            return
        if len(job["images"]) != spec["n_samples"]:
            raise AssertionError(f"{len(job['images'])} images for n_samples {spec['n_samples']}")
        for im in job["images"]:
            r = c.get(im["url"])
            self.note(r)
            img = Image.open(io.BytesIO(r.content))
            img.load()
            if img.size != (spec["w"], spec["h"]):
                raise AssertionError(f"image {img.size}, asked {spec['w']}x{spec['h']}")
            with self.lock:
                self.images += 1

    def run(self, clients: int = 4) -> dict:
        t0 = time.time()
        threads = [threading.Thread(target=self.client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = rss_bytes(self.pid)
        return {"jobs": len(self.specs), "seconds": round(time.time() - t0, 1), "images": self.images,
                "statuses": self.statuses, "rss_baseline_mib": round((self.rss_baseline or 0) / 2**20, 1),
                "rss_end_mib": round(end / 2**20, 1),
                "rss_growth": None if not self.rss_baseline else round(end / self.rss_baseline - 1, 4)}


def test_soak_mixed_concurrent_jobs(server):
    p, url = server
    n = int(os.environ.get("CPUFLOW_SOAK_JOBS", "24"))
    specs = job_specs(n)
    soak = Soak(url, p.pid, specs, baseline_after=min(50, max(len(specs) // 3, 12)))
    summary = soak.run()
    print(f"soak: {summary}")
    assert soak.server_errors == [], soak.server_errors[:5]
    assert soak.problems == [], soak.problems[:5]
    assert p.poll() is None, "the server died"
    assert soak.images >= 1
    assert summary["rss_growth"] is not None and summary["rss_growth"] <= 0.10, summary
