"""The mask side of inpainting (cpuflow/inpaint_mask.py) against diffusers' VaeImageProcessor,
and the samplers' post-step hook."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cpuflow import inpaint_mask as mk
from cpuflow import samplers
from cpuflow.errors import ImageInputError, InvalidArgument

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "epsilon"}


def _random_masks(n=12, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        w, h = int(rng.integers(16, 200)), int(rng.integers(16, 200))
        a = np.zeros((h, w), np.uint8)
        x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        a[y0:int(rng.integers(y0 + 1, h)), x0:int(rng.integers(x0 + 1, w))] = int(rng.integers(1, 256))
        yield Image.fromarray(a, mode="L"), int(rng.integers(0, 40)), [(64, 64), (96, 64), (64, 128)][_ % 3]


def test_crop_region_and_fill_match_diffusers():
    ip = pytest.importorskip("diffusers.image_processor")
    proc = ip.VaeImageProcessor(vae_scale_factor=8)
    for mask, pad, (w, h) in _random_masks():
        assert mk.crop_region(mask, w, h, pad) == proc.get_crop_region(mask, w, h, pad=pad)
        box = mk.crop_region(mask, w, h, pad)
        rgb = mask.convert("RGB")
        want = proc._resize_and_fill(rgb.crop(box), w, h)
        assert np.array_equal(np.asarray(mk.crop_to_work(rgb, box, w, h)), np.asarray(want))


def test_binary_and_latent_mask_match_diffusers():
    torch = pytest.importorskip("torch")
    ip = pytest.importorskip("diffusers.image_processor")
    proc = ip.VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    rng = np.random.default_rng(1)
    mask = Image.fromarray(rng.integers(0, 256, (40, 72), dtype=np.uint8), mode="L")
    want = proc.preprocess(mask, height=40, width=72).numpy()
    got = mk.binary_mask(mask)
    assert np.array_equal(got, want)
    lat = torch.nn.functional.interpolate(torch.from_numpy(want), size=(5, 9)).numpy()
    assert np.array_equal(mk.latent_mask(got, 5, 9), lat)


def test_paste_back_matches_diffusers_apply_overlay():
    ip = pytest.importorskip("diffusers.image_processor")
    proc = ip.VaeImageProcessor(vae_scale_factor=8)
    rng = np.random.default_rng(2)
    original = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    result = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = mk.blur(Image.fromarray((rng.random((96, 128)) > 0.7).astype(np.uint8) * 255, mode="L"), 3)
    box = mk.crop_region(mask, 64, 64, 4)
    want = proc.apply_overlay(mask, original, result, box)
    assert np.array_equal(np.asarray(mk.paste_back(mask, original, result, box)), np.asarray(want))


def test_masks_of_any_mode_and_bad_files():
    # a stroke painted on a transparent layer: transparent = keep (black)
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (4, 4, 8, 8))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    m = mk.load_mask(buf.getvalue())
    assert m.mode == "L" and m.getpixel((5, 5)) == 255 and m.getpixel((0, 0)) == 0
    assert mk.load_mask(Image.new("1", (8, 8), 1)).getpixel((0, 0)) == 255
    assert mk.load_mask(Image.new("I;16", (8, 8), 65535)).getpixel((0, 0)) == 255
    with pytest.raises(ImageInputError, match="mask .* not an image"):
        mk.load_mask(b"not an image at all")
    with pytest.raises(ImageInputError, match="mask .* empty"):
        mk.load_mask(b"")
    with pytest.raises(InvalidArgument, match="mask is empty"):
        mk.require_nonempty(mk.binary_mask(Image.new("L", (8, 8), 100)))   # grey < 0.5 keeps everything
    resized, note = mk.fit_mask(Image.new("L", (10, 20)), (40, 80))
    assert resized.size == (40, 80) and "10x20" in note


def test_post_step_hook_runs_after_every_call_and_replaces_the_latents():
    plan = samplers.make_plan("euler", SD_CONFIG, 5)
    x = np.ones((1, 4, 2, 2), np.float32) * plan.init_noise_sigma
    fn = lambda x_in, t: np.zeros_like(x_in) + 0.1  # noqa: E731
    seen = []

    def post(i, x_new):
        seen.append(i)
        return x_new

    plain = samplers.sample(plan, fn, x, generator=None)
    hooked = samplers.sample(plan, fn, x, generator=None, post_step=post)
    assert seen == list(range(plan.n_model_calls)) and np.array_equal(plain, hooked)
    pinned = samplers.sample(plan, fn, x, generator=None, post_step=lambda i, x_new: np.zeros_like(x_new))
    assert not pinned.any()


def test_noised_latents_follow_the_schedule():
    for name in ("ddim", "euler", "dpmpp_2m"):
        plan = samplers.make_plan(name, SD_CONFIG, 6, strength=0.5)
        x0, noise = np.zeros((1, 1, 1, 1), np.float32), np.ones((1, 1, 1, 1), np.float32)
        levels = [samplers.noised_latents(plan, x0, noise, i).item() for i in range(plan.n_model_calls)]
        assert levels == sorted(levels, reverse=True) and levels[-1] > 0
        assert np.array_equal(samplers.noised_latents(plan, x0, noise, 0), samplers.initial_latents(plan, noise, x0))
