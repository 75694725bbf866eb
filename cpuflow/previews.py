"""Per-step preview images while a picture is being made (API, CLI and server).

A preview shows the sampler's current estimate of the final image (its x0, or
the current latents for samplers that give none):

* through the tiny autoencoder when the model folder has one (``taesd_decoder``,
  added by ``cpuflow export ... --taesd``): a full-size picture, at a few percent
  of a UNet step's cost;
* otherwise through a linear latent -> RGB projection for 4-channel latents,
  with factors fitted for the model's latent space: SD 1.x / 2.x, a 4x3 matrix
  fitted by Keturn ("Decoding latents to RGB without upscaling", Hugging Face
  forums, 2022; the same factors are ComfyUI's ``latent_formats.SD15``); SDXL,
  whose VAE has its own latent space, the 4x3 matrix and RGB bias of ComfyUI's
  ``comfy/latent_formats.py`` ``SDXL`` class (``latent_rgb_factors`` /
  ``latent_rgb_factors_bias``): free, blurry, 1/8 of the final size;
* nothing for other latents.

Usage (the API)::

    def show(image, info):           # a PIL image, {"step", "n_steps", "image", "n_images", "source"}
        image.save(f"preview-{info['step']:04d}.png")

    pipe.txt2img("a lighthouse", steps=20, preview=show, preview_every=5)

A preview that cannot be made (e.g. non-finite early latents of a broken
model) is skipped; it never fails the image.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
from PIL import Image

from .errors import CpuflowError, InvalidArgument

log = logging.getLogger("cpuflow")

PreviewFn = Callable[[Image.Image, dict], None]

# rows: latent channels 0..3; columns: R, G, B (output in about [-1, 1]).
# Both act on the sampler's (scaled) latents, as ComfyUI's previewer does.
SD_LATENT_RGB = np.array([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
], dtype=np.float32)
SDXL_LATENT_RGB = np.array([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
], dtype=np.float32)
SDXL_LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)

# manifest family -> (factors, bias)
LATENT_RGB = {
    "sd1": (SD_LATENT_RGB, np.zeros(3, np.float32)),
    "sd2": (SD_LATENT_RGB, np.zeros(3, np.float32)),
    "sdxl": (SDXL_LATENT_RGB, SDXL_LATENT_RGB_BIAS),
}


def model_family(model: Any) -> str:
    """The manifest's family of a loaded model ("sd1" when unknown)."""
    return str(getattr(getattr(model, "manifest", None), "family", "sd1"))


def latent_to_rgb(latents: np.ndarray, family: str = "sd1") -> Image.Image | None:
    """The linear projection for (1, 4, h, w) latents of ``family``; None for
    other shapes or a family without fitted factors."""
    x = np.asarray(latents, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 4 or family not in LATENT_RGB:
        return None
    factors, bias = LATENT_RGB[family]
    rgb = np.einsum("chw,cr->hwr", x[0], factors) + bias
    rgb = np.nan_to_num((rgb + 1.0) * 127.5, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def event_latents(event: dict) -> np.ndarray | None:
    """What a progress event offers to preview: x0 when the sampler gives it."""
    x = event.get("x0")
    return event.get("latents") if x is None else x


def taesd_preview(model: Any, latents: np.ndarray) -> Image.Image | None:
    """Decode with the folder's tiny autoencoder; None when it has none."""
    from .image import array_to_images
    from .pipelines.model import StageTimer
    from .pipelines.taesd import decode_taesd, has_taesd
    if model is None or not hasattr(model, "manifest") or not has_taesd(model):
        return None
    out = decode_taesd(model, np.ascontiguousarray(latents[:1], dtype=np.float32), StageTimer())
    return array_to_images(out)[0]


def preview_image(model: Any, latents: np.ndarray) -> tuple[Image.Image | None, str]:
    """(image, how): how is "taesd", "approximation" or "none"."""
    img = taesd_preview(model, latents)
    if img is not None:
        return img, "taesd"
    img = latent_to_rgb(latents, model_family(model))
    return (img, "approximation") if img is not None else (None, "none")


class StepPreviews:
    """A progress function that calls ``callback(image, info)`` every ``every``
    steps (and passes every event on to ``progress``)."""

    def __init__(self, model: Any, callback: PreviewFn, every: int = 1,
                 progress: Callable[[dict], None] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgument(f"preview_every must be a whole number >= 1, got {every!r}")
        if not callable(callback):
            raise InvalidArgument("preview must be a function taking (image, info)")
        self.model, self.callback, self.every, self.progress = model, callback, every, progress

    def __call__(self, event: dict) -> None:
        if self.progress is not None:
            self.progress(event)
        step = int(event.get("step", 0))
        if step % self.every:
            return
        latents = event_latents(event)
        if latents is None:
            return
        try:
            img, how = preview_image(self.model, latents)
        except CpuflowError as e:   # e.g. non-finite early latents: skip this preview, keep the image
            log.debug("preview at step %s skipped: %s", step, e)
            return
        if img is None:
            return
        info = {k: event.get(k) for k in ("image", "n_images", "step", "n_steps")}
        info["source"] = how
        self.callback(img, info)


def with_previews(model: Any, progress: Callable[[dict], None] | None, preview: PreviewFn | None,
                  every: int = 1) -> Callable[[dict], None] | None:
    """``progress`` extended with previews (unchanged without ``preview``)."""
    if preview is None:
        return progress
    return StepPreviews(model, preview, every, progress)
