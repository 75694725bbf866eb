"""Textual-inversion embeddings on the server (issue #14): `cpuflow serve
--embeddings-dir DIR` lists the folder's .pt / .safetensors / .bin files at
GET /api/embeddings, requests name them by their word only, and no request can
make the server read a file of its choosing."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

from cpuflow.errors import InvalidArgument  # noqa: E402
from cpuflow.server.app import create_app  # noqa: E402
from test_prompts_server import _safetensors  # noqa: E402  (a safetensors writer without the package)
from test_server import BASE, FakePipeline, make_client, submit, wait  # noqa: E402


@pytest.fixture
def emb_dir(tmp_path):
    d = tmp_path / "embeddings"
    d.mkdir()
    _safetensors(d / "bad-hands.safetensors", {"emb_params": np.ones((2, 8), np.float32)})
    _safetensors(d / "style.SAFETENSORS", {"emb_params": np.ones((1, 8), np.float32)})
    _safetensors(d / "xl.safetensors", {"clip_l": np.ones((1, 8), np.float32), "clip_g": np.ones((1, 12), np.float32)})
    # what is not listed: other suffixes, hidden files, subfolders, links that leave the folder
    (d / "notes.txt").write_text("not an embedding")
    _safetensors(d / ".hidden.safetensors", {"emb_params": np.ones((1, 8), np.float32)})
    (d / "sub").mkdir()
    _safetensors(d / "sub" / "nested.safetensors", {"emb_params": np.ones((1, 8), np.float32)})
    _safetensors(tmp_path / "outside.safetensors", {"emb_params": np.ones((1, 8), np.float32)})
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    return d


def _recording_pipe():
    seen = []
    pipe = FakePipeline()
    real_run = pipe._run
    pipe._run = lambda req, progress: (seen.append(req), real_run(req, progress))[1]
    return pipe, seen


def test_the_folder_is_listed_and_requests_name_its_words(emb_dir):
    pipe, seen = _recording_pipe()
    client = make_client(pipe, embeddings_dir=str(emb_dir))
    got = client.get("/api/embeddings").json()["embeddings"]
    assert got == [{"name": "bad-hands", "vectors": 2, "widths": {"text_encoder": 8}},
                   {"name": "style", "vectors": 1, "widths": {"text_encoder": 8}},
                   {"name": "xl", "vectors": 1, "widths": {"clip_l": 8, "clip_g": 12}}]
    assert client.get("/api/models").json()["embeddings"] == ["bad-hands", "style", "xl"]
    assert str(emb_dir) not in json.dumps(got)          # names only: no path leaves the server
    job = submit(client, prompt="a cat, style", negative_prompt="(bad-hands:1.2)",
                 embeddings=["style", "bad-hands"], steps=1)
    assert wait(client, job["id"])["status"] == "done"
    assert seen[0].embeddings == (str((emb_dir / "style.SAFETENSORS").resolve()),
                                  str((emb_dir / "bad-hands.safetensors").resolve()))
    assert job["params"]["embeddings"] == ["style", "bad-hands"]


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "sub/nested", "nested", "link", "outside",
                                  ".hidden", "bad-hands.safetensors", "..", "%2e%2e%2foutside", "notes",
                                  "..\\outside", "style\x00", ""])
def test_a_request_cannot_name_a_file(emb_dir, name):
    """Every name that is not one of the listed words is refused before any work,
    and the message names the words this server has, never a path."""
    pipe, seen = _recording_pipe()
    client = make_client(pipe, embeddings_dir=str(emb_dir))
    r = client.post("/api/generate", json={"prompt": "x", "embeddings": [name]})
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert "unknown embedding" in msg and "bad-hands, style, xl" in msg
    assert str(emb_dir) not in r.text and "tmp" not in msg
    assert not seen and client.get("/api/jobs").json()["jobs"] == []


def test_a_bad_folder_or_file_stops_the_server_from_starting(tmp_path, emb_dir):
    with pytest.raises(InvalidArgument, match="embeddings folder not found"):
        create_app({"fake": FakePipeline()}, embeddings_dir=str(tmp_path / "nope"))
    _safetensors(emb_dir / "style.bin", {"emb_params": np.ones((1, 8), np.float32)})   # a second "style"
    with pytest.raises(InvalidArgument, match="two embeddings are called 'style'"):
        create_app({"fake": FakePipeline()}, embeddings_dir=str(emb_dir))
    (emb_dir / "style.bin").write_bytes(b"not an embedding at all")
    with pytest.raises(Exception, match="style.bin"):
        create_app({"fake": FakePipeline()}, embeddings_dir=str(emb_dir))


def test_serve_takes_the_folder_option(tmp_path, emb_dir, monkeypatch):
    """`cpuflow serve --embeddings-dir DIR` hands the folder to the app (the server itself is not run)."""
    from click.testing import CliRunner

    from cpuflow import serve_cli
    from cpuflow.cli import main
    seen = {}

    def fake_create_app(models, **kw):
        seen.update(kw)
        raise InvalidArgument("stop here")
    monkeypatch.setattr("cpuflow.server.app.create_app", fake_create_app)
    monkeypatch.setattr(serve_cli, "listen_socket", lambda host, port: None)
    r = CliRunner().invoke(main, ["serve", "--embeddings-dir", str(emb_dir), "--port", "7999"])
    assert "stop here" in r.output, r.output
    assert Path(seen["embeddings_dir"]) == emb_dir
    r = CliRunner().invoke(main, ["serve", "--embeddings-dir", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_an_embedding_from_the_folder_changes_the_shipped_models_image(tmp_path):
    """Through HTTP on the real shipped model: an embedding holding the token-table row of
    "red" gives exactly the image of the prompt with the word "red"."""
    from fastapi.testclient import TestClient

    from cpuflow.manifest import load_manifest
    from cpuflow.pipelines.model import shipped_model_dir
    from cpuflow.tokenizer import ClipTokenizer
    m = load_manifest(shipped_model_dir(), verify=False)
    table = np.load(m.path(m.components["text_encoder"].config["token_embeddings"]["path"]), allow_pickle=False)
    red = ClipTokenizer.from_dir(Path(m.path(m.raw["tokenizer"]["path"]))).token_id("red</w>")
    d = tmp_path / "emb"
    d.mkdir()
    _safetensors(d / "crimsonish.safetensors", {"emb_params": np.asarray(table[red:red + 1], np.float32)})
    app = create_app({"default": None}, embeddings_dir=str(d),
                     load_options={"backend": "onnxruntime", "precision": "f32", "threads": 2})
    client = TestClient(app, base_url=BASE)
    try:
        pixels = []
        for prompt, embeddings in (("a crimsonish circle on a blue background", ["crimsonish"]),
                                   ("a red circle on a blue background", []),
                                   ("a green circle on a blue background", [])):
            job = submit(client, prompt=prompt, embeddings=embeddings, steps=4, seed=11)
            job = wait(client, job["id"])
            assert job["status"] == "done", job
            png = client.get(job["images"][0]["url"]).content
            pixels.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    finally:
        app.state.jobs.stop()
