"""Inpainting masks and the "only masked" crop: pixels only, no model (numpy + PIL).

Conventions (diffusers' StableDiffusionInpaintPipeline, A1111):

* white = repaint, black = keep. Any image mode is read: it is turned into 8-bit
  grey by luminance (``convert("L")``, as diffusers' mask processor); where the
  mask has transparency, transparent counts as black (keep), so a brush stroke
  painted on a transparent layer is a mask.
* a mask of another size than the image is resized to it (LANCZOS, as diffusers'
  ``VaeImageProcessor.resize``) and the caller says so once.
* ``--mask-blur PX``: a Gaussian blur of radius PX on the mask first
  (diffusers' ``VaeImageProcessor.blur``). The model then sees the blurred mask
  binarized at 0.5; the soft edge is what pastes the result over the original in
  "masked" mode.
* the mask the model sees: ``/ 255`` then binarized (< 0.5 -> 0, else 1), the
  masked image is ``image * (mask < 0.5)``, and the latent mask is the pixel mask
  downsampled by nearest neighbour (``torch.nn.functional.interpolate`` default).

"Only masked" (A1111's inpaint area, diffusers' ``padding_mask_crop``): the
rectangle around the white pixels, grown by ``padding`` and then to the aspect
ratio of the working size, is cropped from image and mask, resized to the
working size (the model's own), inpainted there, and pasted back over the
original through the mask (:func:`crop_region`, :func:`resize_and_fill`,
:func:`paste_back` reproduce diffusers' ``get_crop_region``, ``_resize_and_fill``
and ``apply_overlay``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import ImageInputError, InvalidArgument
from .image import MAX_INIT_PIXELS, open_image_keeping_mode

INPAINT_AREAS = ("whole", "masked")
MAX_BLUR = 256
MAX_PADDING = 4096


def load_mask(source: Any, *, name: str | None = None, max_pixels: int = MAX_INIT_PIXELS) -> Image.Image:
    """Read a mask (path, bytes, binary stream or PIL image) safely: an 8-bit grey ("L") image
    at its own size, EXIF orientation applied, transparency counted as black."""
    if isinstance(source, Image.Image):
        img = source.copy()
        img.load()
        label = name or "(image object)"
    else:
        img, label = open_image_keeping_mode(source, max_pixels=max_pixels, name=name, what="mask")
    try:
        return _to_grey(img)
    except Exception as e:
        raise ImageInputError(f"mask {label} has an unsupported pixel mode {img.mode}: {e}") from None


def _to_grey(img: Image.Image) -> Image.Image:
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        top = 65535.0 if mode != "F" else 255.0
        return Image.fromarray(np.rint(np.clip(a, 0, top) * (255.0 / top)).astype(np.uint8), mode="L")
    if has_alpha:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return img.convert("L")


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
    """The mask at ``size`` (the image's): (mask, a note when it had to be resized)."""
    if mask.size == tuple(size):
        return mask, None
    note = (f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}: "
            "the mask was resized to the image")
    return mask.resize(tuple(size), Image.Resampling.LANCZOS), note


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """Gaussian blur of ``radius`` pixels (diffusers' VaeImageProcessor.blur); 0 leaves the mask."""
    radius = int_in_range("mask_blur", radius, 0, MAX_BLUR)
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def binary_mask(mask: Image.Image) -> np.ndarray:
    """float32 (1, 1, H, W): 1 = repaint (grey >= 0.5 after / 255), 0 = keep."""
    a = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    return np.where(a < 0.5, np.float32(0.0), np.float32(1.0))[None, None]


def require_nonempty(mask01: np.ndarray) -> None:
    if not mask01.any():
        raise InvalidArgument("the mask is empty (no pixel is white): there is nothing to repaint",
                              hint="paint the region to repaint in white on black")


def latent_mask(mask01: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """Nearest-neighbour downsampling to the latent grid, as torch's ``interpolate(mask, size=...)``
    (mode 'nearest': source index floor(i * in / out))."""
    h, w = mask01.shape[-2:]
    rows = np.minimum(np.floor(np.arange(latent_height) * np.float32(h / latent_height)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(latent_width) * np.float32(w / latent_width)).astype(np.int64), w - 1)
    return np.ascontiguousarray(mask01[..., rows[:, None], cols[None, :]], dtype=np.float32)


# --- "only masked" ----------------------------------------------------------------------------
def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-black pixels, grown by ``pad`` (clipped to
    the image), then grown to the aspect ratio width:height and shifted back inside the image
    (A1111's "only masked" region; diffusers' ``VaeImageProcessor.get_crop_region``)."""
    pad = int_in_range("padding", pad, 0, MAX_PADDING)
    a = np.asarray(mask.convert("L"))
    h, w = a.shape
    cols = np.flatnonzero(a.any(axis=0))
    rows = np.flatnonzero(a.any(axis=1))
    if cols.size == 0:
        raise InvalidArgument("the mask is empty (no pixel is white): there is nothing to repaint",
                              hint="paint the region to repaint in white on black")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        grow = int((x2 - x1) / ratio - (y2 - y1))
        y1, y2 = _grow(y1, y2, grow, h)
    else:
        grow = int((y2 - y1) * ratio - (x2 - x1))
        x1, x2 = _grow(x1, x2, grow, w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by ``grow`` split evenly, then shift it back inside [0, limit)."""
    lo -= grow // 2
    hi += grow - grow // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def resize_and_fill(img: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside (width, height) keeping the aspect ratio, centred, the empty bands filled by
    stretching the edge rows / columns (diffusers' ``_resize_and_fill``); always RGB out."""
    ratio, src_ratio = width / height, img.width / img.height
    src_w = width if ratio < src_ratio else img.width * height // img.height
    src_h = height if ratio >= src_ratio else img.height * width // img.width
    resized = img.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                      box=(0, band + src_h))
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                      box=(band + src_w, 0))
    return out


def _resize_and_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Cover (width, height) keeping the aspect ratio, centred, the excess cropped."""
    ratio, src_ratio = width / height, img.width / img.height
    src_w = width if ratio > src_ratio else img.width * height // img.height
    src_h = height if ratio <= src_ratio else img.height * width // img.width
    resized = img.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def crop_to_work(img: Image.Image, box: tuple[int, int, int, int], width: int, height: int) -> Image.Image:
    """The region ``box`` of ``img`` at the working size (RGB; a mask is converted back to L by the caller)."""
    return resize_and_fill(img.crop(box), width, height)


def paste_back(mask: Image.Image, original: Image.Image, result: Image.Image,
               box: tuple[int, int, int, int] | None) -> Image.Image:
    """The result over the original through the mask: where the mask is black the original's
    pixels stay, where white the result's; grey blends (diffusers' ``apply_overlay``). With
    ``box`` the result (made at the working size) is first scaled into that region."""
    w, h = original.size
    keep = Image.new("RGBa", (w, h))
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    keep = keep.convert("RGBA")
    if box is not None:
        x1, y1, x2, y2 = box
        base = Image.new("RGBA", (w, h))
        base.paste(_resize_and_crop(result, x2 - x1, y2 - y1), (x1, y1))
        result = base.convert("RGB")
    out = result.convert("RGBA")
    out.alpha_composite(keep)
    return out.convert("RGB")


def int_in_range(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{name} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise InvalidArgument(f"{name} must be an integer, got {value!r}")
        value = int(f)
    v = int(value)
    if not lo <= v <= hi:
        raise InvalidArgument(f"{name} must be between {lo} and {hi} pixels, got {v}")
    return v


def check_area(area: str) -> str:
    if area not in INPAINT_AREAS:
        raise InvalidArgument(f"inpaint_area must be one of {', '.join(INPAINT_AREAS)}, got {area!r}")
    return area
