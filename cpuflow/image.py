"""Everything between pixels and files: init images in, decoded images out.

Reading (:func:`load_init_image`) is the one place where bytes from a user meet a
decoder, so it is strict:

* only the common formats are opened (``ALLOWED_FORMATS``): no EPS (Pillow runs
  Ghostscript for it), no exotic plugins;
* the pixel count is checked from the *header*, before a single pixel is decoded
  (a 100000x100000 PNG is a few hundred bytes and would need 30 GB decoded);
* truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set,
  so a half-uploaded JPEG is refused instead of silently padded with grey;
* every failure is an :class:`ImageInputError` (or :class:`ResourceLimitError`)
  that names the file and what is wrong.

Accepted images are converted deterministically (same bytes in, same pixels out)
to RGB, see :func:`_to_rgb`; :func:`load_init_image` resizes with ``PIL.ImageOps.fit``
(scale to cover, center crop, one LANCZOS resample with a float crop box), and
:func:`read_init_image` keeps the image's size for cpuflow/resize.py to decide.

Writing: :func:`array_to_images` reproduces diffusers'
``VaeImageProcessor.postprocess(output_type="pil")`` bit for bit and refuses
non-finite values (never a black image reported as success);
:func:`save_png_atomic` writes through a temp file and ``os.replace`` so a crash
never leaves a truncated PNG; :func:`png_metadata` records what produced an image
in a form cpuflow and A1111-compatible tools both read.
"""
from __future__ import annotations

import errno
import io
import json
import math
import operator
import os
import re
import stat
import tempfile
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from .errors import (
    CpuflowError,
    DiskSpaceError,
    ImageInputError,
    InvalidArgument,
    NumericalError,
    ResourceLimitError,
)

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_INIT_PIXELS",
    "A1111_SAMPLER_NAMES",
    "load_init_image",
    "read_init_image",
    "init_image_size",
    "load_image_as_stored",
    "image_to_array",
    "array_to_images",
    "check_finite",
    "make_grid",
    "png_metadata",
    "a1111_parameters",
    "a1111_reproduction",
    "parse_a1111_parameters",
    "read_png_metadata",
    "save_png_atomic",
]

#: Pixel budget for an init image, checked from the file header before decoding.
#: 64 MiB of decoded RGBA (4 bytes a pixel) = 16,777,216 pixels, i.e. 4096x4096.
#: Decoding, mode conversion and resizing each hold about one such copy, so an
#: accepted image costs a few hundred MB at worst. Override per call with
#: ``max_pixels=``; Pillow's own bomb limit (``2 * Image.MAX_IMAGE_PIXELS``) still
#: applies on top when larger.
MAX_INIT_PIXELS = 64 * 1024 * 1024 // 4

#: Pillow format names we open (the ``formats=`` of ``Image.open``). JPEG files
#: with a multi-picture extension (most phone cameras) open through "JPEG" as MPO.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

#: A non-seekable stream is read into memory first; this caps that read.
MAX_STREAM_BYTES = 256 * 1024 * 1024

# warnings.catch_warnings() swaps process-global state; serialise our uses of it.
_WARN_LOCK = threading.Lock()


# =============================================================================
# Reading init images
# =============================================================================
def _check_size_arg(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an integer, got {value!r}") from None
    if v <= 0 or v % 8:
        raise InvalidArgument(f"{name} must be a positive multiple of 8, got {v}")
    return v


def _open_source(source, name: str | None, what: str = "init image"):
    """Return (binary file object, display name, close_it) or raise ImageInputError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<bytes>"
        if not data:
            raise ImageInputError(f"{what} {label} is empty (0 bytes)")
        return io.BytesIO(data), label, True

    if isinstance(source, (str, os.PathLike)):
        try:
            path = os.fspath(source)
        except TypeError as e:
            raise ImageInputError(f"{what} path {source!r} is not valid: {e}") from None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        label = name or repr(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageInputError(
                f"{what} {label} does not exist", hint="check the path"
            ) from None
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ImageInputError(f"{what} {label} cannot be accessed: {reason}") from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageInputError(f"{what} {label} is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or device would block or stream forever.
            raise ImageInputError(f"{what} {label} is not a regular file")
        if st.st_size == 0:
            raise ImageInputError(f"{what} {label} is empty (0 bytes)")
        try:
            fp = open(path, "rb")
        except OSError as e:
            raise ImageInputError(
                f"{what} {label} cannot be read: {e.strerror or e}"
            ) from None
        return fp, label, True

    if hasattr(source, "read"):
        label = name or (repr(source.name) if isinstance(getattr(source, "name", None), str)
                         else "<stream>")
        try:
            seekable = bool(source.seekable()) if hasattr(source, "seekable") else False
            if seekable:
                pos = source.tell()
                first = source.read(1)
                source.seek(pos)
                if not first:
                    raise ImageInputError(f"{what} {label} is empty (0 bytes)")
                return source, label, False
            data = source.read(MAX_STREAM_BYTES + 1)
        except CpuflowError:
            raise
        except Exception as e:  # a broken caller stream
            raise ImageInputError(f"{what} {label} cannot be read: {e}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageInputError(f"{what} {label} is not a binary stream")
        if not data:
            raise ImageInputError(f"{what} {label} is empty (0 bytes)")
        if len(data) > MAX_STREAM_BYTES:
            raise ResourceLimitError(
                f"{what} {label} is larger than {MAX_STREAM_BYTES} bytes"
            )
        return io.BytesIO(data), label, True

    raise ImageInputError(
        f"{what} must be a path, bytes or a binary file object, got {type(source).__name__}"
    )


def _open_checked(
    fp, label: str, max_pixels: int, formats=ALLOWED_FORMATS, what: str = "init image"
) -> Image.Image:
    """Image.open + header size check. Nothing is decoded here."""
    try:
        with _WARN_LOCK, warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; we do our own
            # (stricter, configurable) check right below, so silence the warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=list(formats))
    except Image.DecompressionBombError as e:
        raise ResourceLimitError(
            f"{what} {label} is too large to decode ({e})",
            hint=f"the limit is {max_pixels} pixels",
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageInputError(
            f"{what} {label} is not an image in a supported format",
            hint="use " + ", ".join(formats),
        ) from None
    except Exception as e:  # broken headers raise all sorts of things
        raise ImageInputError(f"{what} {label} is damaged: {_reason(e)}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageInputError(f"{what} {label} has an invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ResourceLimitError(
            f"{what} {label} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}",
            hint="downscale it first",
        )
    return img


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"the file is truncated ({text})"
    return text


def _sixteen_to_eight(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by round(v / 257) in integer arithmetic (65535 -> 255, 32768 -> 128)."""
    a = np.clip(a, 0, 65535).astype(np.uint32)  # 65535 * 255 + 32767 < 2**32
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Deterministic conversion of any Pillow mode to 8-bit RGB.

    * transparency (RGBA, LA, La, RGBa, PA, P / L / RGB with a tRNS colour) is
      composited over opaque WHITE: a fully transparent pixel becomes (255, 255, 255);
    * CMYK, YCbCr, LAB, HSV, RGBX, 1, L: Pillow's ``convert("RGB")`` (ICC profiles
      are not applied, as in diffusers' ``convert("RGB")``);
    * 16-bit grey (``I;16*``) and 32-bit ``I``: values clipped to 0..65535 and scaled
      by round(v / 257), so the full 16-bit range maps to the full 8-bit range;
    * float ``F``: taken as 0..255, clipped, rounded half to even, NaN -> 0.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        grey = Image.fromarray(_sixteen_to_eight(np.asarray(img)), mode="L")
        return grey.convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        grey = Image.fromarray(np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode in ("1", "L", "RGB", "P") and img.info.get("transparency") is not None
    )
    if has_alpha:
        if mode == "La":
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _read_rgb(source, max_pixels: int, name: str | None, what: str, *, exif: bool) -> Image.Image:
    """Open, check from the header, decode the first frame, turn by its EXIF
    orientation when ``exif``, and convert to RGB (:func:`_to_rgb`)."""
    fp, label, close_fp = _open_source(source, name, what)
    try:
        img = _open_checked(fp, label, max_pixels, what=what)
        # ``with img`` (not img.close()) so that a caller's stream stays open;
        # our own file is closed in the outer finally.
        with img:
            try:
                img.seek(0)  # animated GIF / APNG / multi-page TIFF: first frame
                img.load()
            except Image.DecompressionBombError as e:
                raise ResourceLimitError(f"{what} {label} is too large to decode ({e})") from None
            except Exception as e:
                raise ImageInputError(f"{what} {label} cannot be decoded: {_reason(e)}") from None
            oriented = None
            if exif:
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:
                    # A malformed EXIF block is no reason to refuse the pixels; use
                    # them as stored (deterministic either way).
                    oriented = None
            if oriented is None or oriented is img:
                oriented = img.copy()
        try:
            return _to_rgb(oriented)
        except Exception as e:
            raise ImageInputError(
                f"{what} {label} has an unsupported pixel mode {oriented.mode}: {e}"
            ) from None
    finally:
        if close_fp:
            fp.close()


def open_image_keeping_mode(source, *, max_pixels: int, name: str | None, what: str) -> tuple[Image.Image, str]:
    """(image, label): read as safely as :func:`load_init_image` (header checked, first
    frame, EXIF orientation applied) but in its own mode (16-bit grey stays 16-bit), for
    readers that convert it themselves (masks, depth maps)."""
    fp, label, close_fp = _open_source(source, name, what)
    try:
        with _open_checked(fp, label, max_pixels, what=what) as opened:
            try:
                opened.seek(0)
                opened.load()
                img = ImageOps.exif_transpose(opened) or opened.copy()
            except Exception as e:
                raise ImageInputError(f"{what} {label} cannot be decoded: {_reason(e)}") from None
            return (opened.copy() if img is opened else img), label
    finally:
        if close_fp:
            fp.close()


def load_image_as_stored(source: str | os.PathLike | bytes | BinaryIO, *, max_pixels: int = MAX_INIT_PIXELS,
                         name: str | None = None, what: str = "image") -> Image.Image:
    """Read an image as safely as :func:`load_init_image`, as RGB, pixel for pixel
    as stored: no EXIF turn, no crop, no resize (what a watermark reader needs:
    its blocks are counted from the stored top-left corner)."""
    return _read_rgb(source, max_pixels, name, what, exif=False)


def _check_max_pixels(max_pixels: Any) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InvalidArgument(f"max_pixels must be a positive integer, got {max_pixels!r}")


def _image_object_as_bytes(source: Image.Image, name: str | None, what: str) -> tuple[bytes, str]:
    """An image object (Python API), serialised losslessly (TIFF keeps every mode, CMYK
    and 16-bit included), so that it takes the same checked path as a file."""
    if 0 in source.size:
        raise ImageInputError(f"{what} {name or '(image object)'} is empty ({source.size[0]}x{source.size[1]})")
    buf = io.BytesIO()
    source.save(buf, format="TIFF")
    return buf.getvalue(), name or "(image object)"


def read_init_image(source: str | os.PathLike | bytes | BinaryIO | Image.Image, *,
                    max_pixels: int = MAX_INIT_PIXELS, name: str | None = None,
                    what: str = "init image") -> Image.Image:
    """An init image read as strictly as :func:`load_init_image` (same sources, checks and
    errors), as RGB at its own size once turned by its EXIF orientation: no crop, no
    resize (cpuflow/resize.py decides the working size from it)."""
    _check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        source, name = _image_object_as_bytes(source, name, what)
    return _read_rgb(source, max_pixels, name, what, exif=True)


def init_image_size(source: str | os.PathLike | bytes | BinaryIO | Image.Image, *,
                    max_pixels: int = MAX_INIT_PIXELS, name: str | None = None,
                    what: str = "init image") -> tuple[int, int]:
    """(width, height) :func:`read_init_image` would return, from the file's header and
    EXIF orientation (tags 5-8 swap the sides), without decoding the pixels."""
    _check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        source, name = _image_object_as_bytes(source, name, what)
    fp, label, close_fp = _open_source(source, name, what)
    try:
        with _open_checked(fp, label, max_pixels, what=what) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)   # ExifTags.Base.Orientation, as exif_transpose reads
            except Exception:
                orientation = 1   # _read_rgb keeps such an image as stored too
            return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    finally:
        if close_fp:
            fp.close()


def load_init_image(
    source: str | os.PathLike | bytes | BinaryIO,
    width: int | None = None,
    height: int | None = None,
    *,
    max_pixels: int = MAX_INIT_PIXELS,
    name: str | None = None,
    what: str = "init image",
) -> Image.Image:
    """Read an init image safely and return it as RGB of the requested size.

    ``source`` is a path, the file's bytes, or a binary file object (not closed
    here). ``name`` replaces the path in error messages (the server passes bytes
    and a neutral name so no filesystem path reaches a client); ``what`` names the
    image in them ("init image", "image to upscale").

    Size: when ``width`` and ``height`` are given (positive multiples of 8) the
    image is scaled to *cover* that size and center-cropped (LANCZOS, one
    resample). When both are None the image keeps its own size rounded DOWN to a
    multiple of 8 by center-cropping the few extra pixels, without resampling;
    a side under 8 pixels is scaled up to 8. When only one is given the other
    follows the image's aspect ratio, rounded down to a multiple of 8 (min 8).
    (img2img, inpainting and depth-to-image choose their size by the model's area and
    the ``resize`` mode instead: cpuflow/resize.py over :func:`read_init_image`.)

    Errors: :class:`ResourceLimitError` when the header (or the requested size)
    exceeds ``max_pixels``; :class:`ImageInputError` for a missing, empty,
    truncated, damaged or non-image file, a directory, or an unsupported format;
    :class:`InvalidArgument` for a bad width/height.
    """
    _check_max_pixels(max_pixels)
    if width is not None:
        width = _check_size_arg("width", width)
    if height is not None:
        height = _check_size_arg("height", height)
    if width is not None and height is not None and width * height > max_pixels:
        raise ResourceLimitError(
            f"requested size {width}x{height} = {width * height} pixels is above the limit of {max_pixels}"
        )

    rgb = read_init_image(source, max_pixels=max_pixels, name=name, what=what)

    w, h = rgb.size
    if width is None and height is None:
        tw, th = max(8, w // 8 * 8), max(8, h // 8 * 8)
        if tw <= w and th <= h:
            left, top = (w - tw) // 2, (h - th) // 2
            out = rgb.crop((left, top, left + tw, top + th))
        else:
            out = ImageOps.fit(rgb, (tw, th), Image.Resampling.LANCZOS)
    else:
        if width is None:
            width = max(8, int(height * w / h) // 8 * 8)
        elif height is None:
            height = max(8, int(width * h / w) // 8 * 8)
        if width * height > max_pixels:
            raise ResourceLimitError(
                f"size {width}x{height} = {width * height} pixels is above the limit of {max_pixels}"
            )
        out = ImageOps.fit(rgb, (width, height), Image.Resampling.LANCZOS)
    if out.mode != "RGB":  # defensive; every branch above yields RGB
        out = out.convert("RGB")
    return out


# =============================================================================
# Arrays <-> images
# =============================================================================
def image_to_array(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 (1, 3, H, W) in [-1, 1].

    Same arithmetic as diffusers' ``VaeImageProcessor.preprocess``:
    ``x.astype(float32) / 255.0`` (pil_to_numpy) then ``2.0 * x - 1.0`` (normalize).
    """
    if not isinstance(img, Image.Image):
        raise InvalidArgument(f"expected a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    x = np.asarray(img).astype(np.float32) / 255.0
    x = 2.0 * x - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise :class:`NumericalError` naming ``name`` when ``x`` holds NaN or inf."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.inexact):
        return
    finite = np.isfinite(a)
    if finite.all():
        return
    n_nan = int(np.isnan(a).sum())
    n_inf = int(a.size - int(finite.sum()) - n_nan)
    raise NumericalError(
        f"non-finite values in {name}: {n_nan} NaN and {n_inf} inf out of {a.size}",
        hint="often an fp16 overflow; try full precision (fp32) or another seed",
    )


def array_to_images(x: np.ndarray) -> list[Image.Image]:
    """Decoded VAE output (B, 3, H, W) in about [-1, 1] -> list of RGB images.

    Bit-exact with diffusers ``VaeImageProcessor.postprocess(output_type="pil")``:
    ``(x * 0.5 + 0.5).clamp(0, 1)`` in the tensor's dtype, ``.float()``, then
    ``(x * 255).round().astype("uint8")`` (numpy round: half to even).
    Any NaN / inf raises :class:`NumericalError` (never a black image).
    """
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != 3:
        raise InvalidArgument(f"expected decoded images of shape (B, 3, H, W), got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise InvalidArgument(f"expected floating-point decoded images, got dtype {a.dtype}")
    check_finite("vae decode", a)
    # denormalize in the array's own dtype (as torch does for a half or double
    # tensor), then .float() as pt_to_numpy does.
    half = a.dtype.type(0.5)
    y = np.clip(a * half + half, 0, 1).astype(np.float32)
    y = y.transpose(0, 2, 3, 1)  # pt_to_numpy
    u8 = (y * 255).round().astype("uint8")  # numpy_to_pil
    return [Image.fromarray(np.ascontiguousarray(im), mode="RGB") for im in u8]


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste images into one grid image, row by row, without padding.

    Columns default to ``n`` for up to 4 images (one row, like a batch row of the
    original txt2img script) and ``ceil(sqrt(n))`` beyond (9 -> 3x3, 5 -> 3+2);
    rows = ceil(n / cols). Each cell is the size of the largest image; smaller
    images sit at the cell's top-left; unused cells stay black.
    """
    images = list(images) if images is not None else []
    if not images:
        raise InvalidArgument("make_grid needs at least one image")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise InvalidArgument(f"make_grid: item {i} is a {type(im).__name__}, not an image")
    n = len(images)
    if cols is None:
        cols = n if n <= 4 else math.ceil(math.sqrt(n))
    elif isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise InvalidArgument(f"grid columns must be a positive integer, got {cols!r}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cw, rows * ch), (0, 0, 0))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im if im.mode == "RGB" else _to_rgb(im), (c * cw, r * ch))
    return grid


# =============================================================================
# PNG metadata
# =============================================================================
#: cpuflow sampler name -> the name AUTOMATIC1111 (and civitai, sd-prompt-reader) use;
#: exactly the samplers of cpuflow.samplers.SAMPLERS (tests/test_image.py checks).
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "lcm": "LCM",
}
_A1111_SCHEDULE_NAMES = {
    "karras": "Karras",
    "exponential": "Exponential",
    "uniform": "Uniform",
    "normal": "Normal",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "polyexponential": "Polyexponential",
    "align_your_steps": "Align Your Steps",
}
_FROM_A1111_SAMPLER = {v: k for k, v in A1111_SAMPLER_NAMES.items()}
_FROM_A1111_SCHEDULE = {v: k for k, v in _A1111_SCHEDULE_NAMES.items()}

#: Prefix of the per-parameter text chunks ("cpuflow:prompt", "cpuflow:seed", ...),
#: so they never clash with PNG's registered keywords or other tools' keys.
META_PREFIX = "cpuflow:"
#: Text chunk holding the whole record as JSON (typed values; what read_png_metadata trusts).
META_JSON_KEY = "cpuflow"
#: A1111-style chunk read by AUTOMATIC1111, civitai, sd-prompt-reader, ...
A1111_KEY = "parameters"

_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return str(v)


def _text(v: Any) -> str:
    """A value as chunk text: strings as is, scalars by str(), the rest as JSON."""
    v = _jsonable(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True)
    return str(v)


def _clean(s: str) -> str:
    # PNG text must not contain NUL; the JSON chunk keeps the exact value.
    return s.replace("\x00", "\ufffd")


def _add_text(info: PngInfo, key: str, value: str) -> None:
    value = _clean(value)
    if value.isascii():
        info.add_text(key, value)
    else:
        # iTXt (UTF-8) for anything beyond ASCII: tEXt is Latin-1 by the spec, but
        # several readers decode it as UTF-8, so we avoid the ambiguity.
        info.add_itxt(key, value)


def _a1111_quote(v: str) -> str:
    # As A1111's generation_parameters_copypaste.quote.
    if "," not in v and "\n" not in v and ":" not in v:
        return v
    return json.dumps(v, ensure_ascii=False)


def _fmt_num(v: Any) -> str:
    v = _jsonable(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else repr(v)
    return str(v)


def a1111_reproduction(params: Mapping[str, Any]) -> str:
    """What the "parameters" text says about reproducing the image in AUTOMATIC1111.

    It cannot, exactly: cpuflow follows diffusers' schedulers (their timestep
    spacing, e.g. "leading" with steps_offset 1 for SD 1.5, and for Karras sigmas
    the range of the spaced timesteps), while A1111's samplers run k-diffusion's
    or CompVis' spacings over the model's full sigma range; A1111 also reads
    "(word)" / "[word]" in a prompt as emphasis. So the text says so plainly
    instead of naming an A1111 schedule that would give another image.
    """
    cls = params.get("scheduler_class")
    how = ""
    if cls:
        bits = [f"timestep spacing {params['timestep_spacing']}"] if params.get("timestep_spacing") else []
        if params.get("karras_sigmas"):
            bits.append("Karras sigmas over the spaced timesteps' range")
        how = f" {cls}" + (f" ({', '.join(bits)})" if bits else "")
    return (f"no: cpuflow follows diffusers'{how or ' schedulers'}, whose steps no A1111 sampler and "
            "schedule type reproduce; A1111 would need the same checkpoint and RNG: CPU for the same "
            "starting noise")


def a1111_parameters(params: Mapping[str, Any]) -> str:
    """The A1111 "parameters" text for a cpuflow record.

    ``<prompt>\nNegative prompt: <neg>\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42,
    Size: 512x512, Model hash: abcd123456, Model: name, Denoising strength: 0.75, RNG: CPU,
    A1111 reproducible: "no: ...", Version: cpuflow 0.1.0``. Missing entries are left out;
    the negative prompt line only when non-empty. "Model hash" is A1111's hash of the
    source checkpoint (``source_model_hash``: the first 10 hex digits of the file's
    sha256), written only when the export read a single file: cpuflow's own
    ``model_hash`` names no checkpoint A1111 knows and stays in the JSON record.
    "Schedule type" is not written: no A1111 schedule reproduces diffusers' spacing
    (:func:`a1111_reproduction` says why); "RNG: CPU" is A1111's option for CPU
    noise, the generator cpuflow's torch-compatible noise (cpuflow/rng.py) reproduces.
    """
    prompt = "" if params.get("prompt") is None else _text(params["prompt"])
    neg = "" if params.get("negative_prompt") is None else _text(params["negative_prompt"])
    fields: list[tuple[str, str]] = []

    def put(label: str, key: str, fmt=_text) -> None:
        if params.get(key) is not None and params.get(key) != "":
            fields.append((label, fmt(params[key])))

    put("Steps", "steps", _fmt_num)
    if params.get("sampler"):
        s = str(params["sampler"])
        fields.append(("Sampler", A1111_SAMPLER_NAMES.get(s, s)))
    put("CFG scale", "guidance", _fmt_num)
    put("Seed", "seed", _fmt_num)
    if params.get("width") is not None and params.get("height") is not None:
        fields.append(("Size", f"{_fmt_num(params['width'])}x{_fmt_num(params['height'])}"))
    if params.get("source_model_hash"):
        fields.append(("Model hash", str(params["source_model_hash"])[:10]))
    put("Model", "model_name")
    put("Denoising strength", "strength", _fmt_num)
    if params.get("clip_skip") not in (None, 1, "1"):   # A1111 writes it only when it is not 1
        fields.append(("Clip skip", _fmt_num(params["clip_skip"])))
    if params.get("rng") == "torch":
        fields.append(("RNG", "CPU"))
    if params.get("sampler"):
        fields.append(("A1111 reproducible", a1111_reproduction(params)))
    version = params.get("cpuflow_version")
    if version:
        fields.append(("Version", f"cpuflow {version}"))
    lines = [prompt]
    if neg:
        lines.append(f"Negative prompt: {neg}")
    lines.append(", ".join(f"{k}: {_a1111_quote(_clean(v))}" for k, v in fields))
    return "\n".join(lines)


# As A1111's re_param_code: key: "quoted, value" | plain value.
_A1111_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 "parameters" text into cpuflow keys (for images made elsewhere)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    found = _A1111_PARAM_RE.findall(last)
    if len(found) >= 3:
        lines = lines[:-1]
    else:
        found = []
    prompt_lines, neg_lines, in_neg = [], [], False
    for line in lines:
        if not in_neg and line.startswith("Negative prompt:"):
            in_neg = True
            line = line[len("Negative prompt:"):].lstrip(" ")
        (neg_lines if in_neg else prompt_lines).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines)}
    if in_neg:
        out["negative_prompt"] = "\n".join(neg_lines)

    def num(s: str):
        try:
            return int(s)
        except ValueError:
            try:
                return float(s)
            except ValueError:
                return s

    for key, value in found:
        key = key.strip()
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if key == "Steps":
            out["steps"] = num(value)
        elif key == "Sampler":
            if value.endswith(" Karras") and value[: -len(" Karras")] in _FROM_A1111_SAMPLER:
                value = value[: -len(" Karras")]  # old A1111: "DPM++ 2M Karras"
                out.setdefault("schedule", "karras")
            out["sampler"] = _FROM_A1111_SAMPLER.get(value, value)
        elif key == "Schedule type":
            out["schedule"] = _FROM_A1111_SCHEDULE.get(value, value)
        elif key == "CFG scale":
            out["guidance"] = num(value)
        elif key == "Seed":
            out["seed"] = num(value)
        elif key == "Size" and re.fullmatch(r"\d+x\d+", value):
            w, h = value.split("x")
            out["width"], out["height"] = int(w), int(h)
        elif key == "Model hash":
            out["model_hash"] = value
        elif key == "RNG":   # "CPU": torch's CPU generator, what cpuflow's torch-compatible noise is
            out["rng" if value == "CPU" else "a1111_rng"] = "torch" if value == "CPU" else value
        elif key == "Model":
            out["model_name"] = value
        elif key == "Denoising strength":
            out["strength"] = num(value)
        elif key == "Clip skip":
            out["clip_skip"] = num(value)
        elif key == "Version":
            if value.startswith("cpuflow "):
                out["cpuflow_version"] = value[len("cpuflow "):]
            else:
                out["version"] = value
        else:
            out[re.sub(r"\W+", "_", key.lower()).strip("_")] = value
    return out


def _with_version(params: Mapping[str, Any]) -> dict[str, Any]:
    record = dict(params)
    if not record.get("cpuflow_version"):
        from . import __version__

        record["cpuflow_version"] = __version__
    return record


def png_metadata(params: Mapping[str, Any]) -> PngInfo:
    """PNG text chunks recording what produced an image.

    * one chunk per parameter, keyword ``"cpuflow:<key>"`` (keys limited to
      ``[A-Za-z0-9_.-]``, at most 64 chars; others live only in the JSON record;
      ``None`` values are skipped), value as text (scalars by ``str``, lists and
      dicts as JSON);
    * ``"cpuflow"``: the whole record as JSON (typed; what :func:`read_png_metadata`
      prefers);
    * ``"parameters"``: A1111-style text (:func:`a1111_parameters`);
    * ``"Software"``: ``cpuflow <version>``.

    ``cpuflow_version`` is filled in when absent. ASCII text goes to tEXt chunks,
    anything else to UTF-8 iTXt, so emoji / CJK prompts round-trip exactly.
    """
    if not isinstance(params, Mapping):
        raise InvalidArgument(f"png metadata must be a mapping, got {type(params).__name__}")
    record = _with_version(params)
    info = PngInfo()
    for key, value in record.items():
        if value is None or not isinstance(key, str) or not _KEY_RE.match(key):
            continue
        _add_text(info, META_PREFIX + key, _text(value))
    blob = json.dumps(
        {str(k): _jsonable(v) for k, v in record.items()}, ensure_ascii=False, sort_keys=False
    )
    _add_text(info, META_JSON_KEY, blob)
    _add_text(info, A1111_KEY, a1111_parameters(record))
    _add_text(info, "Software", f"cpuflow {record['cpuflow_version']}")
    return info


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read back what :func:`png_metadata` wrote.

    Returns the JSON record when present (typed values); else the ``cpuflow:*``
    chunks (as strings); else, for images from A1111-compatible tools, the parsed
    ``parameters`` text; else ``{}``.
    """
    fp, label, close_fp = _open_source(path, None, what="PNG file")
    try:
        img = _open_checked(fp, label, MAX_INIT_PIXELS * 4, formats=("PNG",), what="PNG file")
        with img:
            chunks = {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}
            if not any(k == META_JSON_KEY or k.startswith(META_PREFIX) or k == A1111_KEY
                       for k in chunks):
                # Some tools write text after the image data; reading it decodes the image.
                try:
                    chunks.update({k: v for k, v in img.text.items() if isinstance(v, str)})
                except Exception as e:
                    raise ImageInputError(f"{label} cannot be decoded: {_reason(e)}") from None
    finally:
        if close_fp:
            fp.close()

    blob = chunks.get(META_JSON_KEY)
    if blob is not None:
        try:
            record = json.loads(str(blob))
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
    record = {k[len(META_PREFIX):]: str(v) for k, v in chunks.items() if k.startswith(META_PREFIX)}
    if record:
        return record
    if A1111_KEY in chunks:
        return parse_a1111_parameters(str(chunks[A1111_KEY]))
    return {}


# =============================================================================
# Atomic save
# =============================================================================
def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022  # conservative default rather than racing os.umask() across threads


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename in it survives a crash (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
EXIF_IFD, EXIF_USER_COMMENT = 0x8769, 0x9286


def save_png_atomic(
    img: Image.Image, path: str | os.PathLike, params: Mapping[str, Any] | None = None
) -> Path:
    """Write ``img`` as PNG to ``path`` atomically; return the path.

    The image goes to a hidden temp file in the same folder (``.<name>.*.tmp``),
    is flushed and fsynced, then ``os.replace``\\ d onto ``path`` (and the folder
    fsynced), so readers see either the previous file or the complete new one.
    On any exception, KeyboardInterrupt included, the temp file is removed and
    ``path`` is untouched. If ``path`` is a symlink, the link itself is replaced
    (its target is never written). The file gets the usual ``0666 & ~umask`` mode.
    The parent folder must exist (:class:`InvalidArgument` otherwise); a full
    disk is a :class:`DiskSpaceError`.
    """
    info = png_metadata(params) if params is not None else None
    return _write_atomic(img, path, lambda f: img.save(f, format="PNG", pnginfo=info))


def save_jpeg_atomic(
    img: Image.Image, path: str | os.PathLike, params: Mapping[str, Any] | None = None, *, quality: int = 95
) -> Path:
    """Write ``img`` as JPEG, atomically like :func:`save_png_atomic`. The
    A1111 ``parameters`` text goes to the EXIF UserComment (UNICODE charset,
    UTF-16), where AUTOMATIC1111 writes it for JPEGs and reads it back."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidArgument(f"JPEG quality must be between 1 and 100, got {quality!r}")
    exif = Image.Exif()
    if params is not None:
        text = a1111_parameters(_with_version(params))
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be", "surrogatepass")
    # subsampling=0 (4:4:4 chroma): the invisible watermark (cpuflow/watermark.py) lives in the
    # chroma of 2x2-pixel groups, which the usual 4:2:0 subsampling wipes (README, the watermark).
    return _write_atomic(img, path, lambda f: img.convert("RGB").save(f, format="JPEG", quality=quality,
                                                                      subsampling=0, exif=exif.tobytes()))


def save_image_atomic(
    img: Image.Image, path: str | os.PathLike, params: Mapping[str, Any] | None = None, *, jpeg_quality: int = 95
) -> Path:
    """PNG or JPEG by the file's suffix (.png, .jpg, .jpeg); any other suffix is refused."""
    kind = IMAGE_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise InvalidArgument(f"cannot write {str(path)!r}: cpuflow writes .png or .jpg images",
                              hint="use a .png or .jpg file name, or a folder")
    if kind == "JPEG":
        return save_jpeg_atomic(img, path, params, quality=jpeg_quality)
    return save_png_atomic(img, path, params)


def _write_atomic(img: Image.Image, path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Temp file in the same folder, flushed and fsynced, then renamed onto ``path``."""
    if not isinstance(img, Image.Image):
        raise InvalidArgument(f"expected a PIL image, got {type(img).__name__}")
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InvalidArgument(f"output folder {str(folder)!r} does not exist", hint="create it first")
    if path.is_dir():
        raise InvalidArgument(f"output path {str(path)!r} is a directory")
    try:
        tmp = tempfile.NamedTemporaryFile(
            dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
    except OSError as e:
        raise _write_error(path, e) from None
    tmp_path = tmp.name
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(tmp.fileno(), 0o666 & ~_umask())
            os.fsync(tmp.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    fsync_dir(folder)
    return path


def _write_error(path: Path, e: OSError) -> CpuflowError:
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return DiskSpaceError(f"no space left to write {str(path)!r}: {reason}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InvalidArgument(f"cannot write {str(path)!r}: {reason}", hint="check the folder's permissions")
    return CpuflowError(f"could not write {str(path)!r}: {reason}")
