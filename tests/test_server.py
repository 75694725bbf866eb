"""`cpuflow serve`: the JSON API on a fake pipeline, a tiny exported model and the shipped model.

The fake pipeline has the Pipeline interface (``__call__(request, progress=)``,
``.model.manifest``) and makes flat coloured images from (prompt, seed), so the
API, queue, cancellation and previews are tested in milliseconds. The security
rules are in test_server_security.py, the page in test_browser.py.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cpuflow.config import GenerationRequest  # noqa: E402
from cpuflow.errors import NumericalError  # noqa: E402
from cpuflow.server.app import create_app  # noqa: E402
from cpuflow.watermark import apply as apply_watermark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1:7860"


# --- a fake pipeline ------------------------------------------------------------------
def colour_of(prompt: str, seed: int) -> tuple[int, int, int]:
    d = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    return d[0], d[1], d[2]


class FakePipeline:
    """Same interface as cpuflow.Pipeline; images are a colour from (prompt, seed)
    with a white square in the middle. ``step_delay`` slows each step."""

    def __init__(self, step_delay: float = 0.0, fail: Exception | None = None, name: str = "fake"):
        self.step_delay = step_delay
        self.fail = fail
        self.running = 0
        self.max_running = 0
        self.steps_run = 0
        self.lock = threading.Lock()
        manifest = SimpleNamespace(name=name, default_width=64, default_height=64, model_hash="fake00000000",
                                   raw={"defaults": {"steps": 4, "guidance": 7.5}}, random_weights=False,
                                   components={"unet": 1, "vae_decoder": 1, "vae_encoder": 1, "text_encoder": 1})
        self.model = SimpleNamespace(manifest=manifest, size_multiple=8, default_sampler=lambda: "euler")

    def __call__(self, req: GenerationRequest, progress=None):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            return self._run(req.with_seed(), progress)
        finally:
            with self.lock:
                self.running -= 1

    def _run(self, req, progress):
        if self.fail is not None:
            raise self.fail
        w, h, steps = req.width or 64, req.height or 64, req.steps or 4
        images, records = [], []
        for k in range(req.n_samples):
            seed = req.seed + k
            rng = np.random.default_rng(seed)
            for i in range(steps):
                time.sleep(self.step_delay)
                self.steps_run += 1
                lat = rng.standard_normal((1, 4, h // 8, w // 8)).astype(np.float32)
                if progress:
                    progress({"image": k, "n_images": req.n_samples, "step": i + 1, "n_steps": steps,
                              "latents": lat, "x0": lat * 0.5})
            img = Image.new("RGB", (w, h), colour_of(req.prompt, seed))
            img.paste((255, 255, 255), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
            img, mark = apply_watermark(img, req.watermark)    # the pipelines' finishing step
            images.append(img)
            records.append({"task": "img2img" if req.init_image is not None else "txt2img", "prompt": req.prompt,
                            "negative_prompt": req.negative_prompt, "seed": seed, "sampler": req.sampler or "euler",
                            "schedule": req.schedule, "steps": steps, "guidance": req.guidance or 7.5,
                            "width": w, "height": h, "model_name": "fake", "model_hash": "fake00000000",
                            "backend": "fake", "precision": "f32", "watermark": mark})
            if req.init_image is not None:
                records[-1]["strength"] = req.strength
        return SimpleNamespace(images=images, records=records, warnings=[], timings={})


def make_client(pipe=None, **kw) -> TestClient:
    models = kw.pop("models", None) or {"fake": pipe if pipe is not None else FakePipeline()}
    return TestClient(create_app(models, **kw), base_url=BASE)


def submit(client, **body) -> dict:
    r = client.post("/api/generate", json=dict({"prompt": "a red circle"}, **body))
    assert r.status_code == 202, r.text
    return r.json()


def wait(client, job_id, timeout=60.0, until=("done", "failed", "cancelled")) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not reach {until} in {timeout} s: {job}")


def png_of(client, image: dict) -> Image.Image:
    r = client.get(image["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def b64png(size=(64, 64), colour=(0, 128, 255)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- the page and the models ------------------------------------------------------------
def test_page_is_self_contained():
    c = make_client()
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'id="prompt"' in html and 'id="generate"' in html and 'id="gallery"' in html
    assert "http://" not in html and "https://" not in html and 'src="//' not in html  # no CDN, nothing outside
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert "script-src 'sha256-" in csp and "http" not in csp


def test_models_and_samplers():
    from cpuflow.samplers import SAMPLERS
    c = make_client()
    data = c.get("/api/models").json()
    (m,) = data["models"]
    assert m["id"] == "fake" and m["default"] and m["width"] == 64 and m["steps"] == 4 and m["img2img"]
    assert [s["name"] for s in data["samplers"]] == list(SAMPLERS)
    assert data["limits"]["max_queue"] == 8
    assert "path" not in json.dumps(data).lower()


def test_openapi_schema():
    c = make_client()
    schema = c.get("/api/openapi.json").json()
    for path in ("/api/generate", "/api/jobs/{job_id}", "/api/images/{image_id}", "/api/models",
                 "/api/jobs/{job_id}/cancel", "/api/jobs/{job_id}/events"):
        assert path in schema["paths"], path
    assert "delete" in schema["paths"]["/api/jobs/{job_id}"]
    props = schema["components"]["schemas"]["GenerateBody"]
    assert props.get("additionalProperties") is False
    assert c.get("/docs").status_code == 404        # swagger UI would load from a CDN


# --- generating ---------------------------------------------------------------------------
def test_generate_returns_job_then_images():
    c = make_client()
    job = submit(c, seed=42, n_samples=2, steps=3)
    assert job["status"] in ("queued", "running", "done") and job["params"]["seed"] == 42
    done = wait(c, job["id"])
    assert done["status"] == "done" and done["progress"]["fraction"] == 1.0
    assert [i["seed"] for i in done["images"]] == [42, 43]
    img = png_of(c, done["images"][0])
    assert img.size == (64, 64) and img.getpixel((0, 0)) == colour_of("a red circle", 42)
    meta = json.loads(img.info["cpuflow"])
    assert meta["seed"] == 42 and meta["steps"] == 3 and "parameters" in img.info
    r = c.get(done["images"][0]["url"])
    assert 'filename="cpuflow-42-' in r.headers["content-disposition"]
    listed = c.get("/api/jobs").json()["jobs"]
    assert listed[0]["id"] == job["id"] and listed[0]["preview"] is None


def test_random_seed_is_recorded_and_fixed_seed_repeats():
    c = make_client()
    a = wait(c, submit(c)["id"])
    seed = a["params"]["seed"]
    assert isinstance(seed, int) and a["images"][0]["seed"] == seed
    b = wait(c, submit(c, seed=seed)["id"])
    assert png_of(c, a["images"][0]).tobytes() == png_of(c, b["images"][0]).tobytes()
    d = wait(c, submit(c, seed=(seed + 1) % 2**32)["id"])
    assert png_of(c, d["images"][0]).tobytes() != png_of(c, a["images"][0]).tobytes()


def test_img2img_with_base64_init_image():
    c = make_client()
    job = wait(c, submit(c, init_image="data:image/png;base64," + b64png((80, 48)), strength=0.5, seed=1)["id"])
    assert job["status"] == "done" and job["params"]["img2img"]
    assert (job["params"]["width"], job["params"]["height"]) == (80, 48)   # follows the init image
    assert job["images"][0]["record"]["task"] == "img2img"


def test_progress_events_with_previews():
    c = make_client(FakePipeline(step_delay=0.01))
    job = submit(c, steps=10, seed=3)
    events = []
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "failed", "cancelled"):
                    break
    assert events[-1][0] == "done" and events[-1][1]["images"]
    steps = [d["progress"]["step"] for n, d in events if n == "progress" and d["status"] == "running"]
    assert steps == sorted(steps) and len(set(steps)) >= 2     # polled: steps may be skipped, never reordered
    previews = [d["preview"] for n, d in events if d.get("preview")]
    assert previews and all(p.startswith("data:image/png;base64,") for p in previews)
    img = Image.open(io.BytesIO(base64.b64decode(previews[0].split(",", 1)[1])))
    assert img.size == (8, 8)        # the fake has no VAE: the latent -> RGB projection, 1/8 size


def test_latent_rgb_projection():
    from cpuflow.server.preview import latent_to_rgb, preview_interval
    lat = np.zeros((1, 4, 3, 5), np.float32)
    lat[0, 3] = -1.0                       # channel 4 is mostly "blue-negative": -1 gives a blue cast
    img = latent_to_rgb(lat)
    r, g, b = img.getpixel((0, 0))
    assert img.size == (5, 3) and b > r and b > g
    assert latent_to_rgb(np.zeros((1, 16, 2, 2))) is None
    assert preview_interval(20) == 4 and preview_interval(3) == 1 and preview_interval(20, 7) == 7


# --- queue and cancellation ---------------------------------------------------------------
def test_cancel_running_job_stops_within_a_step_and_server_stays_ready():
    pipe = FakePipeline(step_delay=0.05)
    c = make_client(pipe)
    job = submit(c, steps=150, seed=5)
    wait(c, job["id"], until=("running",))
    while c.get(f"/api/jobs/{job['id']}").json()["progress"]["step"] < 2:
        time.sleep(0.01)
    t0 = time.time()
    r = c.post(f"/api/jobs/{job['id']}/cancel", json={})
    assert r.status_code == 200 and r.json()["cancel_requested"]
    done = wait(c, job["id"])
    assert done["status"] == "cancelled" and done["images"] == []
    assert done["error"]["code"] == "cancelled"
    assert time.time() - t0 < 2.0 and pipe.steps_run < 20       # about one step (50 ms) after the cancel
    nxt = wait(c, submit(c, steps=2, seed=6)["id"])             # ready for the next job
    assert nxt["status"] == "done"
    assert c.post(f"/api/jobs/{nxt['id']}/cancel", json={}).status_code == 409


def test_cancel_queued_job_with_delete():
    pipe = FakePipeline(step_delay=0.05)
    c = make_client(pipe)
    first = submit(c, steps=30)
    second = submit(c, steps=2)
    assert c.delete(f"/api/jobs/{second['id']}").json()["status"] == "cancelled"
    assert wait(c, first["id"])["status"] == "done"
    assert c.get(f"/api/jobs/{second['id']}").json()["status"] == "cancelled"
    assert c.delete("/api/jobs/" + "A" * 22).status_code == 404


def test_queue_is_bounded():
    pipe = FakePipeline(step_delay=0.05)
    c = make_client(pipe, max_queue=2)
    ids = [submit(c, steps=100, seed=i)["id"] for i in range(3)]    # 1 running + 2 waiting
    r = c.post("/api/generate", json={"prompt": "x"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1
    for i in reversed(ids):
        c.post(f"/api/jobs/{i}/cancel", json={})
    assert [wait(c, i)["status"] for i in ids] == ["cancelled"] * 3
    assert wait(c, submit(c, steps=1)["id"])["status"] == "done"      # room again
    assert pipe.max_running == 1


# --- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, code", [
    ({"steps": 0}, 422, "invalid_argument"),
    ({"width": 60}, 422, "invalid_argument"),
    ({"sampler": "nope"}, 422, "invalid_argument"),
    ({"guidance": -1.0}, 422, "invalid_argument"),
    ({"seed": 2**32}, 422, "invalid_argument"),
    ({"strength": 1.5, "init_image": b64png()}, 422, "invalid_argument"),
    ({"model": "../etc"}, 422, "invalid_argument"),
    ({"width": 2048, "height": 2048}, 413, "too_large"),
    ({"n_samples": 9}, 413, "too_large"),
    ({"steps": 151}, 413, "too_large"),
    ({"prompt": "x" * 2001}, 413, "too_large"),
    ({"init_image": "not base64!"}, 422, "invalid_image"),
    ({"init_image": base64.b64encode(b"GIF89a not really").decode()}, 422, "invalid_image"),
    ({"steps": "5"}, 422, "invalid_request"),
    ({"n_samples": True}, 422, "invalid_request"),
    ({"colour": "red"}, 422, "invalid_request"),
])
def test_bad_requests_get_clear_errors(body, status, code):
    c = make_client()
    r = c.post("/api/generate", json=dict({"prompt": "x"}, **body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    if code == "invalid_argument" and "sampler" in body:
        assert "euler" in err["message"] and "dpmpp_2m" in err["message"]   # lists the valid ones


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A 60-byte PNG whose header claims width x height pixels (no pixel data)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_init_image_refused_from_header():
    c = make_client()
    r = c.post("/api/generate", json={"prompt": "x", "init_image": base64.b64encode(bomb_png()).decode()})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_pipeline_errors_become_job_errors_without_paths():
    c = make_client(FakePipeline(fail=NumericalError("non-finite values in /secret/models/x/unet.xml")))
    job = wait(c, submit(c)["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "numerical_error"
    assert "/secret" not in job["error"]["message"]
    c = make_client(FakePipeline(fail=RuntimeError("boom at /home/me/cpuflow/x.py line 3")))
    job = wait(c, submit(c)["id"])
    assert job["error"]["code"] == "internal_error" and "/home" not in json.dumps(job)


def test_concurrent_requests_give_the_serial_images():
    c = make_client(FakePipeline(step_delay=0.001), max_queue=16)
    seeds = [11, 12, 13, 14, 15, 16]
    serial = {s: png_of(c, wait(c, submit(c, seed=s, steps=3)["id"])["images"][0]).tobytes() for s in seeds}
    out, errors = {}, []

    def one(s):
        try:
            out[s] = png_of(c, wait(c, submit(c, seed=s, steps=3)["id"])["images"][0]).tobytes()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and out == serial
    assert c.app.state.pipes["fake"].max_running == 1          # one job at a time


# --- real models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_export):
    return tiny_export("sd1").model


def test_tiny_model_end_to_end(tiny_model):
    from cpuflow import Pipeline
    pipe = Pipeline.load(tiny_model, backend="onnxruntime", threads=1)
    c = make_client(models={"tiny": pipe}, max_queue=8)
    info = c.get("/api/models").json()["models"][0]
    assert info["id"] == "tiny" and info["width"] == 64 and str(tiny_model) not in json.dumps(info)
    job = wait(c, submit(c, prompt="a red car", steps=4, seed=7, sampler="euler")["id"], timeout=120)
    assert job["status"] == "done", job
    assert job["preview"] and job["preview_step"] >= 1           # 64x64: a VAE-decoded preview
    png = png_of(c, job["images"][0])
    direct = pipe(GenerationRequest(prompt="a red car", steps=4, seed=7, sampler="euler")).images[0]
    assert png.size == (64, 64) and np.array_equal(np.asarray(png.convert("RGB")), np.asarray(direct))
    assert json.loads(png.info["cpuflow"])["model_hash"] == info["model_hash"]
    # concurrent == serial, on the real model
    seeds = [1, 2, 3]
    serial = [np.asarray(png_of(c, wait(c, submit(c, prompt="a cat", steps=2, seed=s)["id"])["images"][0]))
              for s in seeds]
    ids = [None] * 3
    ths = [threading.Thread(target=lambda i=i: ids.__setitem__(i, submit(c, prompt="a cat", steps=2,
                                                                           seed=seeds[i])["id"])) for i in range(3)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    for i, jid in enumerate(ids):
        assert np.array_equal(np.asarray(png_of(c, wait(c, jid, timeout=120)["images"][0])), serial[i])
    # cancel on the real model, then the next job still works
    job = submit(c, prompt="a dog", steps=60, seed=9)
    wait(c, job["id"], until=("running",), timeout=120)
    c.post(f"/api/jobs/{job['id']}/cancel", json={})
    assert wait(c, job["id"], timeout=60)["status"] == "cancelled"
    assert wait(c, submit(c, prompt="a dog", steps=2, seed=9)["id"], timeout=60)["status"] == "done"
    c.app.state.jobs.stop()


SHIPPED = ROOT / "cpuflow" / "models" / "default" / "cpuflow.json"


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped model (cpuflow/models/default) is not built yet")
def test_shipped_model_served_by_default():
    c = make_client(models={"default": None})
    info = c.get("/api/models").json()["models"][0]
    assert info["id"] == "default" and info["default"]
    steps = min(info["steps"], 6)
    job = wait(c, submit(c, prompt="a red circle on a blue background", steps=steps, seed=1)["id"], timeout=300)
    assert job["status"] == "done", job
    img = png_of(c, job["images"][0])
    assert img.size == (info["width"], info["height"])
    assert json.loads(img.info["cpuflow"])["seed"] == 1
    c.app.state.jobs.stop()
