"""The tiny autoencoder with SDXL (TAESDXL: diffusers AutoencoderTiny, the same
architecture as TAESD with SDXL-VAE-trained weights).

A tiny random SDXL (tests/helpers_sdxl.py) exported to both formats with a tiny
random AutoencoderTiny (tests/helpers_taesd.py) attached; cpuflow's
``decoder="taesd"`` images compared with diffusers' StableDiffusionXLPipeline /
StableDiffusionXLImg2ImgPipeline whose ``vae`` is that AutoencoderTiny
(float32, >= 50 dB PSNR, both backends). Also: ``--taesd random`` builds an
SDXL-compatible tiny autoencoder (through the direct OpenVINO path, as the
full-size bench export does).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_images import psnr  # noqa: E402
from helpers_sdxl import save_tiny_sdxl_folder  # noqa: E402
from helpers_taesd import save_tiny_taesd_folder  # noqa: E402

from cpuflow import Pipeline  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
STEPS = 4
PROMPT = "a photo of a red car"
BACKENDS = ["openvino", "onnxruntime"]


@pytest.fixture(scope="module")
def sdxl_taesd(tmp_path_factory):
    """(diffusers folder, export with taesd, AutoencoderTiny folder)."""
    from export.build import export_model
    from export.sources import load_source
    from export.taesd import attach_taesd, load_taesd

    base = tmp_path_factory.mktemp("sdxl-taesd")
    src = save_tiny_sdxl_folder(base / "src", seed=0)
    taesd_dir = save_tiny_taesd_folder(base / "taesd", seed=0)
    loaded = load_source(str(src))
    attach_taesd(loaded, *load_taesd(str(taesd_dir)))
    out = export_model(loaded, base / "model", formats=("onnx", "openvino"), progress=lambda *a, **k: None)
    return src, out, taesd_dir


_PIPES: dict = {}


def _cpuflow(out, backend):
    key = (str(out), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(out, backend=backend, precision="f32", threads=1, use_cache=False)
    return _PIPES[key]


def _reference(src, taesd_dir, init=None):
    tiny = diffusers.AutoencoderTiny.from_pretrained(taesd_dir).float().eval()
    cls = diffusers.StableDiffusionXLPipeline if init is None else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_pretrained(src, vae=tiny, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
              generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    img = (pipe(height=SIZE, width=SIZE, **kw) if init is None else pipe(image=init, strength=0.6, **kw)).images[0]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_manifest_lists_the_tiny_autoencoder_beside_the_sdxl_components(sdxl_taesd):
    _, out, _ = sdxl_taesd
    m = json.loads((out / "cpuflow.json").read_text())
    assert m["family"] == "sdxl" and m["validated"] is True
    assert {"text_encoder_2", "taesd_decoder", "taesd_encoder"} <= set(m["components"])
    assert m["export"]["taesd"]["source"]["kind"] == "diffusers_folder"
    for name in ("taesd_decoder", "taesd_encoder"):
        for fmt in ("onnx", "openvino"):
            assert m["components"][name]["variants"]["fp32"]["parity"][fmt]["passed"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_txt2img_decoder_taesd_matches_diffusers(sdxl_taesd, backend):
    src, out, taesd_dir = sdxl_taesd
    ref = _reference(src, taesd_dir)
    res = _cpuflow(out, backend).txt2img(PROMPT, watermark=False, negative_prompt="blurry", steps=STEPS, sampler="euler",
                                         guidance=5.0, width=SIZE, height=SIZE, seed=3, decoder="taesd")
    got = np.asarray(res.images[0])
    assert got.shape == ref.shape and got.std() > 5          # a picture, not a flat clipped field
    p = psnr(got, ref)
    assert p >= PSNR_MIN, f"{backend}: {p:.1f} dB"
    assert "taesd_decoder" in res.timings and "vae_decoder" not in res.timings
    full = _cpuflow(out, backend).txt2img(PROMPT, negative_prompt="blurry", steps=STEPS, sampler="euler",
                                          guidance=5.0, width=SIZE, height=SIZE, seed=3)
    assert psnr(np.asarray(full.images[0]), got) < 40          # the full VAE is really another decoder


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_img2img_decoder_taesd_matches_diffusers(sdxl_taesd, backend):
    from PIL import Image
    src, out, taesd_dir = sdxl_taesd
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = _reference(src, taesd_dir, init=init)
    res = _cpuflow(out, backend).img2img(PROMPT, init, watermark=False, negative_prompt="blurry", strength=0.6, steps=STEPS,
                                         sampler="euler", guidance=5.0, seed=3, decoder="taesd")
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{backend}: {p:.1f} dB"
    assert "taesd_encoder" in res.timings and "vae_encoder" not in res.timings


def test_taesd_random_fits_sdxl_through_the_direct_openvino_path(tiny_sdxl_taesd_ov_export):
    """`--taesd random` (what `cpuflow bench --arch sdxl` exports) builds an AutoencoderTiny
    with TAESDXL's architecture that fits SDXL latents, on an OpenVINO-only export."""
    info, out = tiny_sdxl_taesd_ov_export.taesd_info, tiny_sdxl_taesd_ov_export.model
    assert info["kind"] == "random" and "TAESDXL" in info["name"]
    m = json.loads((out / "cpuflow.json").read_text())
    assert m["validated"] and m["components"]["taesd_decoder"]["config"]["latent_channels"] == 4
    with Pipeline.load(out, backend="openvino", precision="f32", threads=1, use_cache=False) as cf:
        res = cf.txt2img(PROMPT, steps=1, guidance=0.0, width=SIZE, height=SIZE, seed=1, decoder="taesd")
    assert res.images[0].size == (SIZE, SIZE) and "taesd_decoder" in res.timings
