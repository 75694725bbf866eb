"""Preview images while a job runs.

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

log = logging.getLogger("cpuflow.server")

VAE_PREVIEW_PIXELS = 256 * 256
MAX_PREVIEW_SIDE = 256

# rows: latent channels 0..3; columns: R, G, B (output in about [-1, 1])
SD_LATENT_RGB = np.array([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
], dtype=np.float32)


def preview_interval(n_steps: int, every: int | None = None) -> int:
    """Steps between previews: ``every`` when given, else about five per image."""
    if every:
        return max(1, int(every))
    return max(1, round(n_steps / 5))


def latent_to_rgb(latents: np.ndarray) -> Image.Image | None:
    """The linear projection, for (1, 4, h, w) latents; None for other shapes."""
    x = np.asarray(latents, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 4:
        return None
    rgb = np.einsum("chw,cr->hwr", x[0], SD_LATENT_RGB)
    rgb = np.nan_to_num((rgb + 1.0) * 127.5, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


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
    try:
        if width * height <= VAE_PREVIEW_PIXELS:
            img = vae_preview(pipe, latents, width, height)
        if img is None:
            img = latent_to_rgb(latents)
    except Exception as e:  # a preview is a nicety: never let it fail the job
        log.debug("preview failed: %s", e)
        try:
            img = latent_to_rgb(latents)
        except Exception:
            img = None
    if img is None:
        return None
    if max(img.size) > MAX_PREVIEW_SIDE:
        img.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
