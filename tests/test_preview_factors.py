"""Previews without the tiny autoencoder use latent -> RGB factors fitted for the
model's own latent space (issue #16 item 4): SDXL's VAE is not SD 1.5's, so its
latents get ComfyUI's SDXL factors (cpuflow/previews.py cites them)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cpuflow.previews import SD_LATENT_RGB, SDXL_LATENT_RGB, SDXL_LATENT_RGB_BIAS, latent_to_rgb, preview_image


def _model(family):
    return SimpleNamespace(manifest=SimpleNamespace(family=family, components={}))   # no taesd_decoder


def test_sdxl_model_previews_with_sdxl_factors():
    lat = np.zeros((1, 4, 2, 3), np.float32)
    lat[0, 1] = 1.0   # SDXL channel 1 reads blue-ish (-0.25, 0.00, 0.11); SD 1.5's is green (0.33, 0.50, 0.24)
    img, how = preview_image(_model("sdxl"), lat)
    assert how == "approximation" and img.size == (3, 2)
    r, g, b = img.getpixel((0, 0))
    assert b > g > r
    want = np.clip(((SDXL_LATENT_RGB[1] + SDXL_LATENT_RGB_BIAS) + 1) * 127.5, 0, 255).astype(np.uint8)
    assert (r, g, b) == tuple(int(v) for v in want)
    sd_img, _ = preview_image(_model("sd1"), lat)
    r1, g1, b1 = sd_img.getpixel((0, 0))
    assert g1 > r1 > b1 and (r1, g1, b1) == tuple(int(v) for v in ((SD_LATENT_RGB[1] + 1) * 127.5).astype(np.uint8))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_zero_latent_is_mid_grey_up_to_the_bias(family):
    r, g, b = latent_to_rgb(np.zeros((1, 4, 1, 1), np.float32), family).getpixel((0, 0))
    assert abs(r - 127) <= (15 if family == "sdxl" else 1) and abs(g - 127) <= 3 and abs(b - 127) <= 1
    assert latent_to_rgb(np.zeros((1, 16, 1, 1), np.float32), family) is None
