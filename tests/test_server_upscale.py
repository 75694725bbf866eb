"""POST /api/upscale: a finished gallery image through the x4 upscaler (the tiny exported one),
and what the API refuses. The page's button is tested in test_browser.py."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("torch")

from test_server import FakePipeline, make_client, png_of, submit, wait  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_upscale_export):
    c = make_client(models={"fake": FakePipeline(), "x4": tiny_upscale_export.model})
    yield c
    c.app.state.jobs.stop()


def test_models_say_which_is_the_upscaler(client):
    models = {m["id"]: m for m in client.get("/api/models").json()["models"]}
    assert models["x4"]["upscaler"] and not models["fake"]["upscaler"] and models["fake"]["default"]


def test_upscale_a_gallery_image(client):
    done = wait(client, submit(client, prompt="a red circle", seed=11, steps=2)["id"])
    image = done["images"][0]
    r = client.post("/api/upscale", json={"image": image["id"], "steps": 2, "noise_level": 25})
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"], timeout=300)
    assert job["status"] == "done", job
    up = job["images"][0]
    assert (up["width"], up["height"]) == (256, 256) and up["seed"] == 11
    rec = up["record"]
    assert rec["task"] == "upscale" and rec["prompt"] == "a red circle" and rec["noise_level"] == 25
    img = png_of(client, up)
    assert img.size == (256, 256)
    assert job["params"]["image"] == image["id"]


def test_upscale_refusals(client):
    r = client.post("/api/upscale", json={"image": "A" * 22})
    assert r.status_code == 404
    done = wait(client, submit(client, prompt="x", seed=1, steps=1)["id"])
    iid = done["images"][0]["id"]
    r = client.post("/api/upscale", json={"image": iid, "model": "fake"})
    assert r.status_code == 422 and "must be an upscaler" in r.json()["error"]["message"]
    r = client.post("/api/upscale", json={"image": iid, "noise_level": 999})
    assert r.status_code == 422 and "noise_level must be between 0 and 350" in r.json()["error"]["message"]
    r = client.post("/api/generate", json={"prompt": "x", "model": "x4"})
    assert r.status_code == 422 and "is an x4 upscaler" in r.json()["error"]["message"]
    r = client.post("/api/upscale", json={"image": iid, "path": "/etc/passwd"})
    assert r.status_code == 422                      # unknown fields are refused


def test_no_upscaler_served():
    c = make_client()
    try:
        done = wait(c, submit(c, prompt="x", seed=1, steps=1)["id"])
        r = c.post("/api/upscale", json={"image": done["images"][0]["id"]})
        assert r.status_code == 422 and "no x4 upscaler" in r.json()["error"]["message"]
    finally:
        c.app.state.jobs.stop()
