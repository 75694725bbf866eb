"""The per-task pipelines over shared stages (cpuflow/pipelines/run.py): work
done once per request, images handed on as soon as they are made, and the CLI
that writes them as they come."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow import Pipeline
from cpuflow.cli import main
from cpuflow.errors import ImageInputError
from cpuflow.image import read_png_metadata
from cpuflow.pipelines import run as run_mod


@pytest.fixture(scope="module")
def model(tiny_export):
    return tiny_export("sd1").model


def _count_runs(pipe, monkeypatch):
    calls: dict[str, int] = {}
    real = pipe.model.run

    def counting(component, dims, feeds):
        calls[component] = calls.get(component, 0) + 1
        return real(component, dims, feeds)
    monkeypatch.setattr(pipe.model, "run", counting)
    return calls


def _count_loads(pipe, monkeypatch):
    loads: dict[str, int] = {}
    real = pipe.model.backend.load

    def counting(component, *a, **k):
        loads[component] = loads.get(component, 0) + 1
        return real(component, *a, **k)
    monkeypatch.setattr(pipe.model.backend, "load", counting)
    return loads


def _photo(w=64, h=64):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_img2img_encodes_the_init_image_once_per_request(model, monkeypatch):
    with Pipeline.load(model, backend="onnxruntime") as pipe:
        calls = _count_runs(pipe, monkeypatch)
        batch = pipe.img2img("a red circle", _photo(), strength=0.5, steps=4, seed=3, n_samples=3)
        assert calls["vae_encoder"] == 1
        # image k of the batch is still the image of a request with seed + k
        single = pipe.img2img("a red circle", _photo(), strength=0.5, steps=4, seed=5)
    assert np.array_equal(np.asarray(batch.images[2]), np.asarray(single.images[0]))
    assert [r["seed"] for r in batch.records] == [3, 4, 5]


def test_low_memory_loads_unet_and_vae_once_per_request(model, monkeypatch):
    with Pipeline.load(model, backend="onnxruntime", low_memory=True) as pipe:
        loads = _count_loads(pipe, monkeypatch)
        low = pipe.txt2img("a red circle", steps=2, seed=1, n_samples=3)
    assert loads["unet"] == 1 and loads["vae_decoder"] == 1, loads
    with Pipeline.load(model, backend="onnxruntime") as pipe:
        normal = pipe.txt2img("a red circle", steps=2, seed=1, n_samples=3)
    for a, b in zip(low.images, normal.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # each record names the UNet that made its image, although it left memory before the decode
    assert [r["variant"]["unet"] for r in low.records] == [r["variant"]["unet"] for r in normal.records]


def test_on_image_gets_each_image_before_the_next_is_sampled(model):
    events: list[tuple] = []
    with Pipeline.load(model, backend="onnxruntime") as pipe:
        pipe(_request("a red circle", steps=2, seed=1, n_samples=3),
             progress=lambda ev: events.append(("step", ev["image"])),
             on_image=lambda img, rec: events.append(("image", rec["seed"])))
    images = [i for i, e in enumerate(events) if e[0] == "image"]
    firsts = [next(i for i, e in enumerate(events) if e == ("step", k)) for k in (1, 2)]
    assert images[0] < firsts[0] and images[1] < firsts[1]


def _request(prompt, **kw):
    from cpuflow.config import GenerationRequest
    return GenerationRequest(prompt=prompt, **kw)


def test_img2img_without_an_image_is_refused(model):
    with Pipeline.load(model, backend="onnxruntime") as pipe:
        with pytest.raises(ImageInputError, match="needs an init image"):
            pipe.img2img("x", None)
        with pytest.raises(ImageInputError, match="empty"):
            pipe.img2img("x", Image.new("RGB", (0, 0)))


# -- the CLI -------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_strength_without_init_image_is_refused(model, tmp_path):
    r = cli("generate", "--model", model, "x", "--strength", 0.5, "--out", tmp_path / "a.png", "-q")
    assert r.exit_code == 2 and "--init-image" in r.output
    assert not list(tmp_path.iterdir())


def test_out_jpg_writes_a_jpeg_with_parameters(model, tmp_path):
    out = tmp_path / "x.jpg"
    r = cli("generate", "--model", model, "a red circle", "--steps", 2, "--seed", 4, "--out", out,
            "--backend", "onnxruntime", "--jpeg-quality", 90, "-q")
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.format == "JPEG" and out.is_file()
    comment = img.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0") and "Seed: 4" in comment[8:].decode("utf-16-be")


@pytest.mark.parametrize("name", ["x.webp", "x.gif", "x.tiff"])
def test_out_with_an_unwritable_format_is_refused(model, tmp_path, name):
    r = cli("generate", "--model", model, "x", "--steps", 1, "--out", tmp_path / name, "-q")
    assert r.exit_code == 2 and ".png or .jpg" in r.output
    assert not list(tmp_path.iterdir())


def _interrupt_at(monkeypatch, image_index, step=None):
    """Ctrl-C while sampling image ``image_index`` (at its step ``step`` when given)."""
    real = run_mod.Run.sample

    def sample(self, job, x):
        if job.index == image_index and step is None:
            raise KeyboardInterrupt
        if job.index == image_index:
            progress = self.progress

            def stop_at(ev):
                if progress:
                    progress(ev)
                if ev["step"] == step:
                    raise KeyboardInterrupt
            self.progress = stop_at
        return real(self, job, x)
    monkeypatch.setattr(run_mod.Run, "sample", sample)


def test_ctrl_c_late_in_a_batch_keeps_the_images_already_made(model, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 2)
    r = cli("generate", "--model", model, "a red circle", "--steps", 2, "--seed", 7, "--n-samples", 4,
            "--out", tmp_path, "--backend", "onnxruntime", "-q")
    assert r.exit_code == 130
    assert "2 of 4 image(s) were written" in r.output
    files = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in files] == ["image-00000.png", "image-00001.png"]
    assert [read_png_metadata(p)["seed"] for p in files] == [7, 8]
    assert not list(tmp_path.glob(".*"))          # no temp file left


def test_ctrl_c_during_previews_removes_the_unfinished_images_previews(model, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 1, step=3)
    r = cli("generate", "--model", model, "a red circle", "--steps", 4, "--seed", 7, "--n-samples", 2,
            "--preview-every", 1, "--out", tmp_path, "--backend", "onnxruntime")
    assert r.exit_code == 130, r.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "image-00000.png" in names and "image-00001.png" not in names
    assert not [n for n in names if n.startswith("image-00001.preview")], names
    assert [n for n in names if n.startswith("image-00000.preview")]   # the finished image keeps its previews


def test_one_image_ctrl_c_writes_nothing(model, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 0, step=1)
    r = cli("generate", "--model", model, "x", "--steps", 3, "--preview-every", 1,
            "--out", tmp_path / "one.png", "--backend", "onnxruntime")
    assert r.exit_code == 130 and "nothing was written" in r.output
    assert not list(tmp_path.iterdir())


def test_a_jpeg_init_image_round_trip(model, tmp_path):
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG")
    (tmp_path / "in.jpg").write_bytes(buf.getvalue())
    r = cli("generate", "--model", model, "x", "--steps", 2, "--init-image", tmp_path / "in.jpg",
            "--strength", 0.5, "--out", tmp_path / "o.png", "--backend", "onnxruntime", "-q")
    assert r.exit_code == 0, r.output
    assert read_png_metadata(tmp_path / "o.png")["task"] == "img2img"
