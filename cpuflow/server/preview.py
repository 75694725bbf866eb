"""Preview images while a job runs.

A model folder with the tiny autoencoder (``taesd_decoder``, from ``cpuflow
export ... --taesd``) is previewed through it at any size: a full-size picture
for a few percent of a UNet step (cpuflow/previews.py). Without it:

Small images (at most ``VAE_PREVIEW_PIXELS``) are previewed exactly: the
sampler's x0 estimate (or, for samplers that give none, the current latents)
goes through the model's own VAE decoder, the same code as the final image.

Larger ones get a cheap approximation that costs nothing next to a UNet step:
the linear latent -> RGB projection for 4-channel SD latents (a 4x3 matrix,
fitted by Keturn, "Decoding latents to RGB without upscaling", Hugging Face
forums, 2022; the same factors are ComfyUI's ``latent_formats.SD15``). It works
on the scaled latents the sampler holds, gives an image at 1/8 of the final
size, and the browser scales it up.

A preview is a PNG ``data:`` URL; a failure to make one never fails the job.
"""
from __future__ import annotations

import base64
import io
import logging

import numpy as np
from PIL import Image

from ..previews import SD_LATENT_RGB, latent_to_rgb, model_family, taesd_preview  # noqa: F401  (one copy, shared)

log = logging.getLogger("cpuflow.server")

VAE_PREVIEW_PIXELS = 256 * 256
MAX_PREVIEW_SIDE = 256


def preview_interval(n_steps: int, every: int | None = None) -> int:
    """Steps between previews: ``every`` when given, else about five per image."""
    if every:
        return max(1, int(every))
    return max(1, round(n_steps / 5))


def vae_preview(pipe, latents: np.ndarray, width: int, height: int) -> Image.Image | None:
    """Decode with the model's VAE (same steps as the final decode)."""
    from ..image import array_to_images
    from ..pipelines.model import StageTimer
    from ..pipelines.stages import decode_latents
    model = getattr(pipe, "model", None)
    if model is None or not hasattr(model, "run") or not hasattr(model, "latent_dims"):
        return None
    out = decode_latents(model, np.ascontiguousarray(latents, dtype=np.float32), width, height, StageTimer())
    return array_to_images(out)[0]


def make_preview(pipe, event: dict, width: int, height: int) -> str | None:
    latents = event.get("x0")
    if latents is None:
        latents = event.get("latents")
    if latents is None:
        return None
    img = None
    family = model_family(getattr(pipe, "model", None))
    try:
        img = taesd_preview(getattr(pipe, "model", None), latents)
        if img is None and width * height <= VAE_PREVIEW_PIXELS:
            img = vae_preview(pipe, latents, width, height)
        if img is None:
            img = latent_to_rgb(latents, family)
    except Exception as e:  # a preview is a nicety: never let it fail the job
        log.debug("preview failed: %s", e)
        try:
            img = latent_to_rgb(latents, family)
        except Exception:
            img = None
    if img is None:
        return None
    if max(img.size) > MAX_PREVIEW_SIDE:
        img.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
