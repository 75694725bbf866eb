"""How an init image is brought to the working size: the size rule and the three resize modes.

Pixels only (PIL), no model. The pipelines (cpuflow/pipelines/init_image.py) and the
server's request builder (cpuflow/server/request.py) call the same two functions, so a
photo gets the same size from the CLI, the Python API, the HTTP API and ``cpuflow batch``.

The size (:func:`working_size`). A model works best near the area it was trained at
(its manifest's ``default_size``: 512x512 for SD 1.5, 768x768 for SD 2.x-768, 1024x1024
for SDXL, 64x64 for the shipped toy model); a 1600x1200 photo taken at its own size is
7x the work of 512x512 and, beyond the trained area, the UNet repeats subjects. So with
no ``-W/-H`` the photo's aspect ratio is kept at the model's area: the ideal sides are
``sqrt(area * w / h)`` and ``sqrt(area * h / w)``, each rounded to the nearest multiple
of the model's size multiple (8 for every current export: the VAE's downscale), at
least one multiple. 1600x1200 on SD 1.5: 591.2 x 443.4 -> 592x440. With one of
``-W/-H`` the other follows the photo's aspect ratio (rounded the same way); with both,
they are used as given.

The modes (:func:`resize_to`), for when the photo's aspect ratio is not the working
size's (both sides given, or the rounding above), after AUTOMATIC1111's img2img
"Resize mode" (modules/images.py ``resize_image``):

* ``crop`` (A1111 "Crop and resize", the default): scale to cover, centre-crop
  (``PIL.ImageOps.fit``, LANCZOS). Nothing is distorted and nothing is invented; only
  the edges of the longer side are lost, which is what a photo can best spare.
* ``fit`` (A1111 "Resize and fill"): scale to fit inside (``PIL.ImageOps.contain``),
  centre it, and fill the bands by repeating the outermost row / column of the photo
  outward (as A1111 stretches the edges). All of the photo is kept; the bands continue
  the edge's colours instead of a flat letterbox colour, which img2img would otherwise
  keep as a hard bar at usual strengths (a model can turn a smeared edge into content).
* ``stretch`` (A1111 "Just resize"): plain LANCZOS resize to the size, aspect ratio not kept.

An image already at the working size is returned as is (no resample), so a photo at
the model's size gives the pixels diffusers' pipelines would get.
"""
from __future__ import annotations

import math

from PIL import Image, ImageOps

from .config import MAX_PIXELS, RESIZE_MODES
from .errors import InvalidArgument, ResourceLimitError

__all__ = ["RESIZE_MODES", "DEFAULT_RESIZE", "working_size", "resize_to", "describe"]

DEFAULT_RESIZE = RESIZE_MODES[0]   # crop


def _nearest_multiple(x: float, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``x`` (halves up), at least ``multiple``."""
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def working_size(photo: tuple[int, int], width: int | None, height: int | None, *,
                 native: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(width, height) an init image of size ``photo`` is worked at (module docstring):
    both given: those; one given: the other from the photo's aspect ratio; none: the
    photo's aspect ratio at the area ``native[0] * native[1]``. Sides are multiples of
    ``multiple``; a size over cpuflow's pixel budget is a :class:`ResourceLimitError`."""
    pw, ph = photo
    if pw < 1 or ph < 1:
        raise InvalidArgument(f"the init image has an invalid size {pw}x{ph}")
    if width is not None and height is not None:
        w, h = width, height
    elif width is not None:
        w, h = width, _nearest_multiple(width * ph / pw, multiple)
    elif height is not None:
        w, h = _nearest_multiple(height * pw / ph, multiple), height
    else:
        area = native[0] * native[1]
        w = _nearest_multiple(math.sqrt(area * pw / ph), multiple)
        h = _nearest_multiple(math.sqrt(area * ph / pw), multiple)
    if w * h > MAX_PIXELS:
        raise ResourceLimitError(f"a {pw}x{ph} init image at this size is {w}x{h} = {w * h} pixels, over the "
                                 f"pixel budget of {MAX_PIXELS} (2048x2048)",
                                 hint="give both --width and --height, or crop the image first")
    return w, h


def check_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise InvalidArgument(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return mode


def resize_to(img: Image.Image, size: tuple[int, int], mode: str = DEFAULT_RESIZE) -> Image.Image:
    """``img`` (any mode: a photo or a grey mask, the same geometry for both) at ``size``, by ``mode``."""
    check_mode(mode)
    size = (int(size[0]), int(size[1]))
    if img.size == size:
        return img.copy()
    if mode == "crop":
        return ImageOps.fit(img, size, Image.Resampling.LANCZOS)
    if mode == "stretch":
        return img.resize(size, Image.Resampling.LANCZOS)
    return _fit_with_edges(img, size)


def _fit_with_edges(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to fit inside ``size``, centre, and fill the bands with the edge rows / columns repeated."""
    w, h = size
    inner = ImageOps.contain(img, size, Image.Resampling.LANCZOS)
    iw, ih = inner.size
    x0, y0 = (w - iw) // 2, (h - ih) // 2
    out = Image.new(img.mode, size)
    out.paste(inner, (x0, y0))
    # left / right bands: the first and last column of the photo, over its rows
    for band_x, band_w, col in ((0, x0, x0), (x0 + iw, w - x0 - iw, x0 + iw - 1)):
        if band_w > 0:
            strip = out.crop((col, y0, col + 1, y0 + ih)).resize((band_w, ih), Image.Resampling.NEAREST)
            out.paste(strip, (band_x, y0))
    # top / bottom bands: the first and last row, over the full width (corners included)
    for band_y, band_h, row in ((0, y0, y0), (y0 + ih, h - y0 - ih, y0 + ih - 1)):
        if band_h > 0:
            strip = out.crop((0, row, w, row + 1)).resize((w, band_h), Image.Resampling.NEAREST)
            out.paste(strip, (0, band_y))
    return out


def describe(task: str, photo: tuple[int, int], size: tuple[int, int], mode: str) -> str:
    """The line the CLI prints: ``img2img: 1600x1200 photo -> 592x440 (crop)``."""
    return f"{task}: {photo[0]}x{photo[1]} photo -> {size[0]}x{size[1]} ({mode})"
