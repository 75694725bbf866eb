"""Depth-to-image: parity with diffusers' StableDiffusionDepth2ImgPipeline on a tiny random
depth model (5-channel UNet + tiny random DPT depth estimator), f32, both backends, with
the depth estimated by the exported estimator and with a depth map given by the user;
the depth estimator's export; the depth map's pixel side against torch; bad input.
Random weights: plumbing and numerics, not images.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_depth import tiny_depth_pipeline  # noqa: E402
from helpers_images import psnr  # noqa: E402
from PIL import Image  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow import depth_map as dm  # noqa: E402
from cpuflow.config import GenerationRequest  # noqa: E402
from cpuflow.errors import ImageInputError, InvalidArgument  # noqa: E402

PSNR_MIN = 50.0
STEPS = 6
PROMPT = "a red circle"
_PIPES: dict = {}


def _cpuflow(out, backend):
    key = (str(out), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(out, backend=backend, precision="f32", threads=2, use_cache=False)
    return _PIPES[key]


@pytest.fixture(scope="module")
def depth(tiny_depth_export):
    return tiny_depth_export.model, tiny_depth_pipeline(tiny_depth_export.src)


def _init(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _reference(pipe, sampler, **kw):
    cls, over = {"plms": ("PNDMScheduler", {"skip_prk_steps": True}),
                 "euler_a": ("EulerAncestralDiscreteScheduler", {})}[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **over)
    return np.asarray(pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(7), **kw).images[0])


def test_export_records_the_depth_estimator(depth):
    m = json.loads((depth[0] / "cpuflow.json").read_text())
    assert m["unet_kind"] == "depth"
    assert m["components"]["unet"]["inputs"][0]["shape"][1] == 5
    est = m["components"]["depth_estimator"]
    assert est["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert set(est["variants"]["fp32"]["files"]) == {"onnx", "openvino"}
    assert all(p["passed"] for p in est["variants"]["fp32"]["parity"].values())
    assert m["depth"]["preprocess"] == {"height": 32, "width": 32, "resample": 3, "rescale_factor": 1 / 255,
                                        "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_estimated_depth_matches_diffusers(depth, backend):
    out, pipe = depth
    init = _init()
    ref = _reference(pipe, "plms", image=init, strength=0.8)
    res = _cpuflow(out, backend).img2img(PROMPT, init, strength=0.8, steps=STEPS, sampler="plms", guidance=7.5,
                                         seed=7)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"depth2img (estimated) {backend}: {p:.1f} dB"
    assert res.records[0]["task"] == "depth2img" and res.records[0]["depth_map"] == "estimated"
    assert res.extras["depth_map"].size == (64, 64)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_given_depth_map_matches_diffusers(depth, backend):
    out, pipe = depth
    init = _init(1)
    d = np.random.default_rng(2).random((1, 40, 48)).astype(np.float32)
    png16 = Image.fromarray(np.rint(d[0] * 65535).astype(np.uint16))     # what a user's depth PNG holds
    given = torch.from_numpy(np.asarray(png16, dtype=np.float32)[None])
    ref = _reference(pipe, "euler_a", image=init, depth_map=given, strength=0.7)
    res = _cpuflow(out, backend)(GenerationRequest(prompt=PROMPT, init_image=init, depth_map=png16, strength=0.7,
                                                   steps=STEPS, sampler="euler_a", guidance=7.5, seed=7))
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"depth2img (given depth) {backend}: {p:.1f} dB"
    assert res.records[0]["depth_map"] == "given"


def test_depth_pixels_match_torch_and_transformers():
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    from helpers_depth import PREPROCESSOR
    rng = np.random.default_rng(3)
    for (h, w), (oh, ow) in [((64, 64), (8, 8)), ((40, 48), (9, 7)), ((5, 6), (13, 17))]:
        d = rng.random((2, h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(d)[:, None], size=(oh, ow), mode="bicubic",
                                               align_corners=False)[:, 0].numpy()
        np.testing.assert_allclose(dm.bicubic_resize(d, oh, ow), want, atol=2e-6)
    fe = DPTImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"})
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    want = fe(images=[img], return_tensors="pt").pixel_values.numpy()
    pre = {"height": 32, "width": 32, "resample": 3, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3,
           "image_std": [0.5] * 3}
    np.testing.assert_allclose(dm.estimator_input(img, pre), want, atol=1e-6)


def test_cli_save_depth_and_bad_depth_maps(depth, tmp_path):
    from click.testing import CliRunner

    from cpuflow.cli import main
    _init(4).save(tmp_path / "room.png")
    base = ["generate", "--model", str(depth[0]), PROMPT, "--init-image", str(tmp_path / "room.png"),
            "--backend", "onnxruntime", "--steps", "2", "--seed", "1", "-q"]
    r = CliRunner().invoke(main, base + ["--save-depth", "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    saved = Image.open(tmp_path / "a.depth.png")
    assert saved.size == (64, 64) and saved.mode.startswith("I")
    # the saved map given back: the same picture up to its 16-bit rounding
    r = CliRunner().invoke(main, base + ["--depth-map", str(tmp_path / "a.depth.png"), "--out", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    assert psnr(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))) > 35
    (tmp_path / "notes.txt").write_text("this is not a picture")
    r = CliRunner().invoke(main, base + ["--depth-map", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "c.png")])
    assert r.exit_code != 0 and "depth map" in r.output and "not an image" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "c.png").exists()
    cf = _cpuflow(depth[0], "onnxruntime")
    with pytest.raises(InvalidArgument, match="flat"):
        cf(GenerationRequest(prompt=PROMPT, init_image=_init(), depth_map=Image.new("L", (8, 8), 7), steps=2))
    with pytest.raises(InvalidArgument, match="needs an init image"):
        cf.txt2img(PROMPT, steps=2)
    with pytest.raises(ImageInputError, match="depth map .* empty"):
        cf(GenerationRequest(prompt=PROMPT, init_image=_init(), depth_map=b"", steps=2))
