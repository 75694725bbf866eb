"""Prompt features over HTTP and from PNGs (no torch): clip_skip and embeddings in
POST /api/generate, POST /api/params-from-image, and cpuflow.from_image.params_from_png."""
from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cpuflow.errors import InvalidArgument
from cpuflow.from_image import params_from_png
from cpuflow.image import png_metadata

A1111_TEXT = ("a (red:1.2) circle, BREAK blue background\nNegative prompt: green\n"
              "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
              "Size: 128x96, Model hash: abcdef0123, Clip skip: 2, Version: v1.10.1")


def _png(text: str | None = None, record: dict | None = None) -> bytes:
    buf = io.BytesIO()
    info = png_metadata(record) if record is not None else PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v, "<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_params_from_an_a1111_png():
    params, notes = params_from_png(_png(A1111_TEXT))
    assert params == {"prompt": "a (red:1.2) circle, BREAK blue background", "negative_prompt": "green",
                      "seed": 1234, "sampler": "dpmpp_2m", "schedule": "karras", "steps": 12, "guidance": 6.5,
                      "width": 128, "height": 96, "clip_skip": 2}
    assert notes == []


def test_params_from_a_cpuflow_png_and_unknown_sampler():
    rec = {"prompt": "a cat", "negative_prompt": "", "seed": 5, "sampler": "euler", "schedule": "default",
           "steps": 7, "guidance": 3.0, "width": 64, "height": 64, "clip_skip": 1}
    params, _ = params_from_png(_png(record=rec))
    assert params == {"prompt": "a cat", "seed": 5, "sampler": "euler", "schedule": "default", "steps": 7,
                      "guidance": 3.0, "width": 64, "height": 64, "clip_skip": 1}
    params, notes = params_from_png(_png(A1111_TEXT.replace("DPM++ 2M", "Restart")))
    assert "sampler" not in params and "Restart" in notes[0]
    with pytest.raises(InvalidArgument, match="no generation parameters"):
        params_from_png(_png())


def test_cli_from_image_explicit_options_win(tmp_path, monkeypatch):
    """--from-image fills what the command line leaves out (the run itself: tests/test_prompts.py)."""
    import click
    from click.testing import CliRunner

    from cpuflow import cli
    png = tmp_path / "old.png"
    png.write_bytes(_png(A1111_TEXT))
    seen = {}

    def fake_request(**kw):
        seen.update(kw)
        raise click.ClickException("stop")
    monkeypatch.setattr("cpuflow.config.GenerationRequest", fake_request)
    r = CliRunner().invoke(cli.main, ["generate", "--from-image", str(png), "--steps", "3", "-q"])
    assert "stop" in r.output, r.output
    assert seen["prompt"] == "a (red:1.2) circle, BREAK blue background" and seen["steps"] == 3
    assert seen["seed"] == 1234 and seen["clip_skip"] == 2 and seen["width"] == 128


def test_api_clip_skip_embeddings_and_params_from_image(tmp_path):
    pytest.importorskip("fastapi")
    from test_server import FakePipeline, make_client, submit, wait
    emb = tmp_path / "myemb.safetensors"
    _safetensors(emb, {"emb_params": np.ones((2, 8), np.float32)})
    seen = []
    pipe = FakePipeline()
    real_run = pipe._run
    pipe._run = lambda req, progress: (seen.append(req), real_run(req, progress))[1]
    client = make_client(pipe, embeddings=[str(emb)])
    assert client.get("/api/models").json()["embeddings"] == ["myemb"]
    job = submit(client, prompt="a myemb cat", clip_skip=2, embeddings=["myemb"], steps=1)
    assert wait(client, job["id"])["status"] == "done"
    assert seen[0].clip_skip == 2 and seen[0].embeddings == (str(emb),)
    assert job["params"]["clip_skip"] == 2 and job["params"]["embeddings"] == ["myemb"]
    r = client.post("/api/generate", json={"prompt": "x", "embeddings": ["/etc/passwd"]})
    assert r.status_code == 422 and "unknown embedding" in r.text and "myemb" in r.text
    r = client.post("/api/generate", json={"prompt": "x", "clip_skip": 0})
    assert r.status_code == 422 and "clip_skip" in r.text
    r = client.post("/api/params-from-image", json={"image": base64.b64encode(_png(A1111_TEXT)).decode()})
    assert r.status_code == 200 and r.json()["params"]["clip_skip"] == 2 and r.json()["params"]["seed"] == 1234
    r = client.post("/api/params-from-image", json={"image": base64.b64encode(_png()).decode()})
    assert r.status_code == 422 and "no generation parameters" in r.text
