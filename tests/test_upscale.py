"""The x4 upscaler: export, parity with diffusers' StableDiffusionUpscalePipeline, tiles, bad input.

One tiny random upscaler (tests/helpers_upscale.py), exported once per session to both formats
(the ``tiny_upscale_export`` fixture). Random weights: plumbing and parity, not image quality.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cpuflow import Pipeline
from cpuflow.errors import ImageInputError, IncompatibleModelError, InvalidArgument, ManifestError, ResourceLimitError
from helpers_images import psnr

pytest.importorskip("torch")
pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a photo of a cat", "dog"


def _image(w: int = 32, h: int = 24, seed: int = 0) -> Image.Image:
    """A smooth random picture (low-res images are smooth; pure noise would be unusual input)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def test_export_manifest(tiny_upscale_export):
    m = json.loads((tiny_upscale_export.model / "cpuflow.json").read_text())
    assert m["family"] == "x4-upscaler" and m["prediction_type"] == "v_prediction"
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder"}   # the pipeline never encodes
    unet_in = {s["name"]: s for s in m["components"]["unet"]["inputs"]}
    assert unet_in["sample"]["shape"][1] == 7 and unet_in["class_labels"]["dtype"] == "int64"
    assert m["latent"]["scaling_factor"] == 0.08333 and m["latent"]["downscale"] == 4
    up = m["upscaler"]
    assert up["max_noise_level"] == 350 and up["image_channels"] == 3 and up["factor"] == 4
    assert up["low_res_scheduler"]["_class_name"] == "DDPMScheduler"
    assert m["scheduler"]["_class_name"] == "DDIMScheduler" and m["defaults"]["guidance"] == 9.0
    for comp in m["components"].values():
        for fmt, entry in comp["variants"]["fp32"]["parity"].items():
            assert entry["passed"], (fmt, entry)


def _diffusers(src, image, *, steps, guidance, noise_level, seed, negative=NEGATIVE):
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(src)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, image=image, num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level,
               negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return out.images[0]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_parity_with_diffusers(tiny_upscale_export, backend):
    """Same weights, seed, noise level, guidance, negative prompt and steps: >= 50 dB (f32).
    The low-res noise and the latents come from the seed in diffusers' order."""
    image = _image()
    ref = _diffusers(tiny_upscale_export.src, image, steps=3, guidance=7.0, noise_level=30, seed=5)
    with Pipeline.load(tiny_upscale_export.model, backend=backend, precision="f32") as pipe:
        res = pipe.upscale(image, PROMPT, negative_prompt=NEGATIVE, steps=3, guidance=7.0, noise_level=30, seed=5)
    out = res.images[0]
    assert out.size == ref.size == (128, 96)
    db = psnr(out, ref)
    assert db >= 50, f"{backend}: {db:.1f} dB"
    rec = res.records[0]
    assert rec["task"] == "upscale" and rec["noise_level"] == 30 and rec["seed"] == 5
    assert (rec["input_width"], rec["input_height"], rec["width"], rec["height"]) == (32, 24, 128, 96)
    assert rec["tile"] == 0


@pytest.fixture(scope="module")
def ov_pipe(tiny_upscale_export):
    with Pipeline.load(tiny_upscale_export.model, backend="openvino", precision="f32") as pipe:
        yield pipe


def test_parity_without_guidance_and_noise_level_matters(tiny_upscale_export, ov_pipe):
    image = _image(seed=1)
    ref = _diffusers(tiny_upscale_export.src, image, steps=2, guidance=1.0, noise_level=0, seed=3)
    out = ov_pipe.upscale(image, PROMPT, steps=2, guidance=1.0, noise_level=0, seed=3).images[0]
    assert psnr(out, ref) >= 50
    other = ov_pipe.upscale(image, PROMPT, steps=2, guidance=1.0, noise_level=200, seed=3).images[0]
    assert psnr(out, other) < 40   # the noise level reaches the image and the UNet


def test_tile_covering_the_image_is_exactly_untiled(ov_pipe):
    image = _image(48, 40, seed=2)
    kw = dict(steps=2, guidance=5.0, noise_level=20, seed=7)
    whole = ov_pipe.upscale(image, PROMPT, **kw)
    covered = ov_pipe.upscale(image, PROMPT, tile=48, **kw)
    assert np.array_equal(np.asarray(whole.images[0]), np.asarray(covered.images[0]))
    assert covered.records[0]["tile"] == 0 and "covers" in covered.records[0]["tile_choice"]


def test_tiles_blend_into_the_untiled_image(ov_pipe):
    """Tiles of 32 over a 48x40 input (4 UNet windows and 4 VAE windows): the same picture
    as the untiled run, up to what a window cannot see, and no seam along the tile edges."""
    image = _image(48, 40, seed=2)
    kw = dict(steps=2, guidance=5.0, noise_level=20, seed=7)
    whole = np.asarray(ov_pipe.upscale(image, PROMPT, **kw).images[0]).astype(np.float64)
    res = ov_pipe.upscale(image, PROMPT, tile=32, **kw)
    tiled = np.asarray(res.images[0]).astype(np.float64)
    assert res.records[0]["tile"] == 32 and tiled.shape == whole.shape == (160, 192, 3)
    assert psnr(tiled, whole) > 25
    # a seam would show as a jump between neighbouring columns / rows where windows meet
    err = np.abs(tiled - whole).mean(axis=2)
    col_jump = np.abs(np.diff(err, axis=1)).mean(axis=0)
    row_jump = np.abs(np.diff(err, axis=0)).mean(axis=1)
    assert col_jump.max() < 4 * np.median(col_jump) + 2
    assert row_jump.max() < 4 * np.median(row_jump) + 2


def test_blend_weights_are_a_partition_of_unity():
    from cpuflow.pipelines.upscale import _windows, unet_overlap
    total = np.zeros((200, 150))
    for y, x, th, tw, w in _windows(200, 150, 64, unet_overlap(64)):
        assert th == tw == 64 and (w > 0).all()
        total[y:y + th, x:x + tw] += w
    assert (total > 0).all()
    assert _windows(20, 30, None, 0) == [(0, 0, 20, 30, None)]


def test_choose_tile():
    from cpuflow.pipelines.upscale import AUTO_TILE, choose_tile
    assert choose_tile(None, 128, 96)[0] is None
    assert choose_tile(None, 512, 512)[0] == AUTO_TILE
    assert choose_tile(64, 128, 128)[0] == 64
    assert choose_tile(256, 128, 200)[0] is None


# ------------------------------------------------------------------ bad input
def test_noise_level_out_of_range(ov_pipe):
    with pytest.raises(InvalidArgument, match="noise_level must be between 0 and 350"):
        ov_pipe.upscale(_image(), PROMPT, noise_level=351, steps=1)
    with pytest.raises(InvalidArgument, match="noise_level"):
        ov_pipe.upscale(_image(), PROMPT, noise_level=-1, steps=1)


def test_not_an_image_and_too_large(ov_pipe, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageInputError, match="image to upscale .* not an image"):
        ov_pipe.upscale(bad, PROMPT, steps=1)
    big = tmp_path / "big.png"
    Image.new("RGB", (1100, 1000)).save(big)
    with pytest.raises(ResourceLimitError, match="above the limit of 1048576"):
        ov_pipe.upscale(big, PROMPT, steps=1)
    with pytest.raises(InvalidArgument, match="tile must be"):
        ov_pipe.upscale(_image(), PROMPT, tile=12)
    with pytest.raises(InvalidArgument, match="unknown upscale parameter"):
        ov_pipe.upscale(_image(), PROMPT, width=64)


def test_upscaler_folder_refused_by_generate(ov_pipe):
    with pytest.raises(InvalidArgument, match="is an x4 upscaler, not a text-to-image model"):
        ov_pipe.txt2img("a cat", steps=1)


def test_txt2img_folder_refused_by_upscale(tiny_export):
    with Pipeline.load(tiny_export("sd2-v").model, backend="onnxruntime") as pipe:
        with pytest.raises(InvalidArgument, match="not an x4 upscaler"):
            pipe.upscale(_image(), PROMPT, steps=1)


def test_manifest_without_upscaler_block_is_refused(tiny_upscale_export, tmp_path):
    import shutil

    from cpuflow.manifest import load_manifest
    folder = tmp_path / "x4"
    shutil.copytree(tiny_upscale_export.model, folder)
    data = json.loads((folder / "cpuflow.json").read_text())
    up = data.pop("upscaler")
    (folder / "cpuflow.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="lacks the upscaler block"):
        load_manifest(folder)
    data["upscaler"] = dict(up, image_channels=2)
    (folder / "cpuflow.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelError, match="unet takes 7 input channels"):
        load_manifest(folder)


def test_vendored_full_size_configs_build():
    """--random-weights --arch x4-upscaler builds from these (offline); checked on the meta device."""
    from export import sources as src
    from export.sources_upscale import check_configs, load_vendored
    cfgs = load_vendored()
    check_configs("vendored", cfgs["unet"], cfgs["vae"], cfgs["text_encoder"], cfgs["low_res_scheduler"])
    unet = src._build("unet", cfgs["unet"], empty=True)
    assert unet.conv_in.in_channels == 7 and unet.class_embedding.num_embeddings == 1000
    n = sum(p.numel() for p in unet.parameters())
    assert 4.6e8 < n < 4.8e8, n   # the released UNet has 473 M parameters
    vae = src._build("vae", cfgs["vae"], empty=True)
    assert vae.config.scaling_factor == 0.08333 and len(vae.config.block_out_channels) == 3


def test_quantized_upscaler_unet_exports_passes_its_gate_and_upscales(tiny_upscale_export, tmp_path):
    """#12: `--quantize int8-weights int8` works for the upscaler's UNet too: the calibration runs
    the runtime's own upscale (export/calibrate.py through pipelines/upscale.sample_upscaled), the
    held-out gate passes, and each variant upscales. ONNX only (the same export code serves both formats)."""
    from export.build import export_model
    from export.sources import load_source

    out = export_model(load_source(str(tiny_upscale_export.src)), tmp_path / "q", formats=("onnx",),
                       quantize=("int8-weights", "int8"), calibration_size=2, calibration_steps=2,
                       progress=lambda *a, **k: None)
    m = json.loads((out / "cpuflow.json").read_text())
    unet = m["components"]["unet"]["variants"]
    assert {"fp32", "int8-weights", "int8"} <= set(unet)
    for name in ("int8-weights", "int8"):
        par = unet[name]["parity"]["onnx"]
        assert par["passed"] and par["finite"], (name, par)
    image = _image()
    ref = None
    for variant in ("fp32", "int8-weights", "int8"):
        with Pipeline.load(out, backend="onnxruntime", variant=variant) as pipe:
            res = pipe.upscale(image, PROMPT, steps=2, guidance=7.0, noise_level=30, seed=5, watermark=False)
        assert res.records[0]["variant"]["unet"] == variant
        img = np.asarray(res.images[0])
        assert img.shape == (image.height * 4, image.width * 4, 3)
        if ref is None:
            ref = img
        else:   # random weights: a weak bar, but a broken quantized UNet gives noise far below it
            assert psnr(img, ref) > 15, (variant, psnr(img, ref))
