"""An init image is worked at the model's native area with the photo's aspect ratio, brought
there by --resize crop|fit|stretch (cpuflow/resize.py, cpuflow/pipelines/init_image.py), the
same from the CLI, the Python API, the HTTP API and `cpuflow batch`, and the size used is said.
The shipped model (64x64 native) runs the end-to-end cases: no export, a second or two each."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow import Pipeline
from cpuflow.cli import main
from cpuflow.config import GenerationRequest
from cpuflow.errors import InvalidArgument, ResourceLimitError
from cpuflow.image import read_png_metadata
from cpuflow.resize import resize_to, working_size


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shipped():
    with Pipeline.load(None, backend="onnxruntime", threads=2) as pipe:
        yield pipe


# --- the size rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("photo,native,want", [
    ((1600, 1200), 512, (592, 440)),      # the photo on SD 1.5: 591.2 x 443.4
    ((1200, 1600), 512, (440, 592)),      # portrait: the sides swap
    ((1920, 1080), 512, (680, 384)),      # 16:9
    ((1000, 1000), 512, (512, 512)),      # square: the native size itself
    ((3000, 1000), 768, (1328, 440)),     # 3:1 on SD 2.x-768
    ((1600, 1200), 1024, (1184, 888)),    # SDXL
    ((100, 70), 64, (80, 56)),            # the shipped toy model
])
def test_no_size_given_keeps_the_aspect_ratio_at_the_native_area(photo, native, want):
    w, h = working_size(photo, None, None, native=(native, native), multiple=8)
    assert (w, h) == want
    assert w % 8 == 0 and h % 8 == 0
    assert abs(w * h / native ** 2 - 1) < (0.1 if native < 256 else 0.03)   # area close to native
    assert abs((w / h) / (photo[0] / photo[1]) - 1) < (0.1 if native < 256 else 0.02)


def test_one_side_given_the_other_follows_the_photo_and_both_given_are_used():
    rule = dict(native=(512, 512), multiple=8)
    assert working_size((1600, 1200), 768, None, **rule) == (768, 576)
    assert working_size((1600, 1200), None, 512, **rule) == (680, 512)     # 682.7 -> nearest multiple
    assert working_size((1600, 1200), 512, 512, **rule) == (512, 512)
    assert working_size((1600, 1200), None, None, native=(512, 512), multiple=64) == (576, 448)
    assert working_size((4000, 10), None, None, **rule) == (10240, 24)     # a sliver: at least one multiple
    with pytest.raises(ResourceLimitError, match="pixel budget"):
        working_size((100, 1000), 2048, None, **rule)                        # 2048 x 20480


# --- the modes, on a synthetic picture ----------------------------------------------------------
def _scene() -> Image.Image:
    """128x64 grey, a red band (16 px) on the left, a blue one on the right, a white 32x32
    square in the middle."""
    a = np.full((64, 128, 3), 100, np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, -16:] = (0, 0, 255)
    a[16:48, 48:80] = 255
    return Image.fromarray(a)


def _white_box(img: Image.Image) -> tuple[int, int]:
    white = (np.asarray(img) > 200).all(axis=2)
    rows, cols = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
    return int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _reddish(img: Image.Image) -> float:
    a = np.asarray(img).astype(int)
    return float(((a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)).mean())


def test_crop_covers_and_cuts_the_sides():
    out = resize_to(_scene(), (64, 64), "crop")
    assert out.size == (64, 64)
    assert _white_box(out) == (32, 32)            # not scaled, not distorted
    assert _reddish(out) < 0.02                   # the red and blue sides are cut away


def test_fit_keeps_everything_and_fills_the_bands_with_the_edges():
    out = resize_to(_scene(), (64, 64), "fit")
    a = np.asarray(out)
    assert _white_box(out) == (16, 16)            # scaled by 1/2, not distorted
    assert _reddish(Image.fromarray(a[16:48])) > 0.1   # both sides kept
    assert (a[16:48, 2] == (255, 0, 0)).all() and (a[16:48, -3] == (0, 0, 255)).all()
    # the photo sits in rows 16..47; the bands above and below repeat its first and last row
    assert (a[:16] == a[16]).all() and (a[48:] == a[47]).all()
    assert not (a == 0).all(axis=2).any()         # no black letterbox


def test_stretch_resizes_to_the_size_without_keeping_the_aspect_ratio():
    out = resize_to(_scene(), (64, 64), "stretch")
    assert _white_box(out) == (16, 32)            # squeezed horizontally only
    assert _reddish(out) > 0.1


def test_a_photo_already_at_the_size_is_not_resampled():
    img = _photo(72, 56)
    for mode in ("crop", "fit", "stretch"):
        assert np.array_equal(np.asarray(resize_to(img, (72, 56), mode)), np.asarray(img))
    with pytest.raises(InvalidArgument, match="crop, fit, stretch"):
        resize_to(img, (64, 64), "squash")
    with pytest.raises(InvalidArgument, match="resize must be one of crop, fit, stretch"):
        GenerationRequest(prompt="x", resize="squash")


@pytest.mark.parametrize("mode", ["crop", "fit", "stretch"])
def test_the_inpainting_mask_is_resized_with_the_picture(shipped, mode):
    """--inpaint-area whole: the mask goes through the same resize as the picture, so the
    region to repaint stays on the same pixels in every mode."""
    from cpuflow.pipelines.inpaint import prepare
    a = np.zeros((60, 130, 3), np.uint8)
    a[5:30, 10:50] = 255                          # an off-centre rectangle, in the picture and the mask
    photo = Image.fromarray(a)
    mask = Image.fromarray(a[..., 0], mode="L")
    req = GenerationRequest(prompt="x", init_image=photo, mask=mask, width=64, height=64, resize=mode)
    spec = prepare(shipped.model, req, 64, 64)
    assert (spec.width, spec.height) == (64, 64) and spec.pixels.shape == (1, 3, 64, 64)
    assert spec.mask01.any()
    assert np.array_equal(spec.pixels[0, 0] > 0, spec.mask01[0, 0] > 0.5)
    assert spec.record(req)["resize"] == mode and spec.record(req)["init_size"] == "130x60"


# --- end to end on the shipped model -------------------------------------------------------------
def test_cli_says_the_size_and_the_image_and_its_parameters_have_it(tmp_path):
    _photo(1600, 1200).save(tmp_path / "photo.png")
    out = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "a red circle", "--init-image", str(tmp_path / "photo.png"),
                                  "--steps", "2", "--seed", "1", "--backend", "onnxruntime", "--out", str(out),
                                  "-q"])
    assert r.exit_code == 0, r.output
    # 64x64 native: 73.9 x 55.4 -> 72x56
    assert "img2img: 1600x1200 photo -> 72x56 (crop)" in r.output
    assert Image.open(out).size == (72, 56)
    meta = read_png_metadata(out)
    assert (meta["width"], meta["height"], meta["init_size"], meta["resize"]) == (72, 56, "1600x1200", "crop")
    assert "Size: 72x56" in Image.open(out).info["parameters"]
    out2 = tmp_path / "o2.png"
    r = CliRunner().invoke(main, ["generate", "a red circle", "--init-image", str(tmp_path / "photo.png"),
                                  "-W", "64", "--resize", "stretch", "--steps", "2", "--backend", "onnxruntime",
                                  "--out", str(out2), "-q"])
    assert r.exit_code == 0, r.output
    assert "img2img: 1600x1200 photo -> 64x48 (stretch)" in r.output and Image.open(out2).size == (64, 48)
    r = CliRunner().invoke(main, ["generate", "a red circle", "--resize", "fit", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "--resize applies to an init image" in r.output
    assert "crop" in CliRunner().invoke(main, ["generate", "--help"]).output


def test_api_img2img_and_inpaint_without_a_size(shipped):
    photo = _photo(128, 64)                       # 2:1 -> 90.5 x 45.3 -> 88x48
    res = shipped.img2img("a red circle", photo, strength=0.5, steps=2, seed=3, resize="fit")
    assert res.images[0].size == (88, 48)
    assert (res.records[0]["init_size"], res.records[0]["resize"]) == ("128x64", "fit")
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (40, 10, 90, 50))
    res = shipped.inpaint("a red circle", photo, mask, steps=2, seed=3)
    assert res.images[0].size == (88, 48) and res.records[0]["task"] == "inpaint"


def test_server_takes_resize_and_refuses_a_bad_one(shipped):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from cpuflow.server.app import create_app
    c = TestClient(create_app({"default": shipped}), base_url="http://127.0.0.1:7860")
    init = base64.b64encode(_png_bytes(_photo(1600, 1200))).decode()
    r = c.post("/api/generate", json={"prompt": "x", "init_image": init, "resize": "squash", "steps": 2})
    assert r.status_code == 422, r.text
    assert "resize" in r.json()["error"]["message"] and "crop" in r.json()["error"]["message"]
    r = c.post("/api/generate", json={"prompt": "x", "init_image": init, "resize": "fit", "steps": 2, "seed": 1})
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["params"]["width"], job["params"]["height"], job["params"]["resize"]) == (72, 56, "fit")
    t0 = time.time()
    while (job := c.get(f"/api/jobs/{job['id']}").json())["status"] not in ("done", "failed") \
            and time.time() - t0 < 60:
        time.sleep(0.05)
    assert job["status"] == "done", job
    rec = job["images"][0]["record"]
    assert (rec["width"], rec["height"], rec["init_size"], rec["resize"]) == (72, 56, "1600x1200", "fit")


def test_batch_jobs_take_resize(tmp_path):
    from cpuflow.batch.jobs import make_jobs
    _photo(1600, 1200).save(tmp_path / "photo.png")
    info = {"id": "m", "width": 64, "height": 64, "size_multiple": 8, "steps": 2, "guidance": 7.5,
            "sampler": "euler", "model_hash": "h", "taesd": False}
    jobs = make_jobs([("a:1", {"prompt": "x", "seed": 1, "init_image_path": "photo.png", "resize": "fit"}),
                      ("a:2", {"prompt": "x", "seed": 1, "init_image_path": "photo.png", "resize": "squash"}),
                      ("a:3", {"prompt": "x", "seed": 1, "init_image_path": "photo.png"})], info, base_dir=tmp_path)
    fit, bad, crop = jobs
    assert (fit.request.resize, fit.request.width, fit.request.height) == ("fit", 72, 56)
    assert bad.request is None and "resize" in bad.error and "crop" in bad.error
    assert crop.request.resize == "crop" and crop.id != fit.id     # the mode is part of the job's identity
    assert json.loads(json.dumps(fit.params))["resize"] == "fit"
