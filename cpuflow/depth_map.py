"""Depth maps for depth-to-image, pixels only (numpy + PIL, no torch).

What diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map does, replayed:

* estimated depth: the DPT depth estimator's input is the image resized to the
  processor's fixed size with its PIL filter, ``* rescale_factor``, ``- mean``,
  ``/ std`` (the manifest's ``depth.preprocess``, written by export/depth.py);
* the depth (estimated, or given by the user as an image) is resized to the latent
  grid with torch's bicubic interpolation (``align_corners=False``, a = -0.75,
  Keys 1981), then scaled to [-1, 1] by its own min and max:
  ``2 (d - min) / (max - min) - 1``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image

from .errors import ImageInputError, InvalidArgument
from .image import MAX_INIT_PIXELS, open_image_keeping_mode

_A = -0.75   # torch's cubic convolution coefficient (upsample_bicubic2d)


def estimator_input(img: Image.Image, pre: Mapping[str, Any]) -> np.ndarray:
    """RGB image -> pixel_values (1, 3, height, width) float32, as the DPT feature extractor makes them."""
    size = (int(pre["width"]), int(pre["height"]))
    rgb = img.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling(int(pre["resample"])))
    x = np.asarray(rgb).astype(np.float32) * np.float32(pre["rescale_factor"])
    x = (x - np.asarray(pre["image_mean"], np.float32)) / np.asarray(pre["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def load_depth_map(source: Any, *, name: str | None = None, max_pixels: int = MAX_INIT_PIXELS) -> np.ndarray:
    """A depth map given by the user (an image: 8/16-bit grey, or colour read as grey) ->
    float32 (1, H, W) in its own units (only the relative values matter)."""
    if isinstance(source, Image.Image):
        img = source.copy()
    else:
        img, _ = open_image_keeping_mode(source, max_pixels=max_pixels, name=name, what="depth map")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float32)
    else:
        a = np.asarray(img.convert("L"), dtype=np.float32)
    if not np.isfinite(a).all():
        raise ImageInputError("the depth map holds non-finite values")
    return np.ascontiguousarray(a[None], dtype=np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n, 4) weights of the taps at floor - 1 .. floor + 2 for fractions t (Keys, a = -0.75)."""
    def near(x):   # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def _resize_axis(a: np.ndarray, out: int, axis: int) -> np.ndarray:
    n = a.shape[axis]
    real = np.float32(n / out) * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    w = _cubic_weights((real - base).astype(np.float32)).astype(np.float32)
    idx = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)
    taken = np.take(a, idx, axis=axis)             # axis -> (out, 4)
    shape = [1] * taken.ndim
    shape[axis], shape[axis + 1] = out, 4
    return (taken * w.reshape(shape)).sum(axis=axis + 1, dtype=np.float32)


def bicubic_resize(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H, W) -> (B, height, width): torch ``interpolate(mode="bicubic", align_corners=False)``."""
    a = np.asarray(depth, dtype=np.float32)
    return _resize_axis(_resize_axis(a, height, 1), width, 2)


def depth_condition(depth: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """The UNet's extra channel: (1, 1, lh, lw) in [-1, 1]."""
    d = bicubic_resize(depth, latent_height, latent_width)[:, None]
    lo, hi = d.min(), d.max()
    if not hi > lo:
        raise InvalidArgument("the depth map is flat (one value everywhere): it says nothing about the scene",
                              hint="give a depth map with near and far parts, or let the model estimate one")
    return (np.float32(2.0) * (d - lo) / (hi - lo) - np.float32(1.0)).astype(np.float32)


def depth_image(depth: np.ndarray, width: int, height: int) -> Image.Image:
    """A depth map as a 16-bit grey PNG-ready image at (width, height), near = bright, scaled
    to the full range (what --save-depth writes; --depth-map reads it back)."""
    d = bicubic_resize(depth, height, width)[0].astype(np.float64)
    lo, hi = d.min(), d.max()
    scaled = np.zeros_like(d) if not hi > lo else (d - lo) / (hi - lo)
    return Image.fromarray(np.rint(scaled * 65535).astype(np.uint16))
