"""The invisible watermark: the DWT-DCT method of the ``invisible-watermark``
package (``imwatermark``, method ``"dwtDct"``), the one the original Stable
Diffusion scripts and diffusers' SDXL pipelines use, in numpy alone (no OpenCV,
no torch, no PyWavelets: the one Haar level it needs is four lines, equal bit for
bit to ``pywt.dwt2``, and six times faster here).

What imwatermark's ``EmbedMaxDct`` does, and what this module reproduces so that
either side reads the other's images:

* colour: OpenCV's 8-bit ``COLOR_BGR2YUV`` (BT.601 luma, U = 0.492 (B - Y) + 128,
  fixed point with 14 fraction bits): :func:`_rgb_to_u` equals its U on all 2**24
  colours. Only U carries the mark: its scales are ``[0, 36, 36]`` but its loop
  visits channels 0 and 1 only, and Y's scale 0 means "skip".
* transform: one level of the 2-D Haar DWT (``pywt.dwt2(..., "haar")``) of U
  cropped to a multiple of 4 pixels; the approximation band is cut into 4x4
  blocks, numbered row by row; block ``k`` carries message bit ``k % n_bits``.
* in each block, the coefficient of largest magnitude other than the block's
  first (row-major, first one on ties) is quantised with step 36
  (quantisation index modulation): its magnitude modulo 36 is 9 for a 0 bit and
  27 for a 1 bit. The "DCT" of the name is commented out in imwatermark's code;
  the coefficients are the Haar ones.
* reading: a block says 1 when that magnitude modulo 36 exceeds 18; a message
  bit is 1 when the mean of its blocks' votes times 255 exceeds 127.
* messages: ``np.unpackbits`` of the bytes, most significant bit first.

Where the embedding differs from imwatermark's (the reader is unchanged, so
imwatermark still decodes every image this module marks, see the tests):

* imwatermark moves the coefficient to a level in the cell it is in
  (``val // 36``), up to 27 away, which can drop it below a neighbour so the
  reader then picks another coefficient. We move it to the nearest level of the
  bit that keeps it the largest of its block: at most 18 away.
* imwatermark converts the whole image to YUV and back (rounding every pixel),
  rebuilds U with the horizontal and vertical detail bands swapped (which moves
  chroma between neighbouring pixels) and casts floats to uint8 by truncation,
  wrapping out-of-range values. We change only the 2x2 pixels under each
  moved coefficient (1/16 of the image), by the Haar synthesis of the change
  (each pixel moves by half of it), and carry the U change to RGB with OpenCV's
  YUV -> RGB factors (B += 2.032 dU, G -= 0.395 dU; R and, to 0.03 %, Y stay),
  rounded and clipped; where clipping kept a block from its bit, the level on
  the other side is tried once.

A second mark carries the same message in the luma (cpuflow/watermark_luma.py:
QIM of the means of JPEG's 8x8 luma blocks). It is written first, adding the same
amount to R, G and B, which leaves U, and so the DWT-DCT mark written after it and
what imwatermark reads, as they were. It is what survives an ordinary JPEG (4:2:0
chroma subsampling wipes the DWT-DCT mark); :func:`detect` reports the message when
either mark reads it, and which did.

Images under 256x256 pixels are left unmarked (imwatermark refuses to read or
write them; the shipped model's 64x64 pictures are such): :func:`apply` returns
the reason, which the PNG metadata records.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import __version__
from .errors import InvalidArgument
from .watermark_luma import embed_luma, read_luma

__all__ = [
    "MESSAGE", "MIN_PIXELS", "SCALE", "Found", "message_for_version", "too_small",
    "embed", "detect", "apply", "read_bits", "DWTDCT", "LUMA",
]

#: Quantisation step of imwatermark's dwtDct for U (its default scales [0, 36, 36]).
SCALE = 36.0
#: Side of the blocks of the Haar approximation band (8x8 pixels each).
BLOCK = 4
#: imwatermark's encoder and decoder refuse images with fewer pixels than this.
MIN_PIXELS = 256 * 256


def message_for_version(version: str = __version__) -> bytes:
    """cpuflow's message: ``b"cf"`` and the major and minor version digits
    (``0.1.0`` -> ``b"cf01"``; each digit is the number modulo 10).

    Four bytes, 32 bits, the length of the Stable Diffusion 2 scripts' ``b"SDV2"``:
    ``WatermarkDecoder("bytes", 32)`` reads either.
    """
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in (version.split(".") + ["0", "0"])[:2]]
    return b"cf" + f"{parts[0] % 10}{parts[1] % 10}".encode("ascii")


MESSAGE = message_for_version()


def _bits(message: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(message, dtype=np.uint8))


# Messages other tools embed with dwtDct, so `cpuflow watermark` can name them.
# (name, bits); cpuflow's own is matched by pattern in _name_cpuflow.
_SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110  # diffusers' StableDiffusionXLWatermarker
_KNOWN = [
    ("Stable Diffusion 2 scripts (SDV2)", _bits(b"SDV2")),
    ("Stable Diffusion 1 scripts (StableDiffusionV1)", _bits(b"StableDiffusionV1")),
    ("SDXL (diffusers / Stability's generative-models)",
     np.array([int(b) for b in bin(_SDXL_MESSAGE)[2:]], dtype=np.uint8)),
]


# ---------------------------------------------------------------------------------
# OpenCV's 8-bit BGR -> YUV, U only, in integers (imgproc color_yuv: yuv_shift = 14,
# CV_DESCALE(x, n) = (x + 2**(n-1)) >> n, saturate to 0..255). Equal to
# cv2.cvtColor(..., COLOR_BGR2YUV)[..., 1] on all 2**24 colours (tests/test_watermark.py).
# ---------------------------------------------------------------------------------
_SHIFT = 14
_R2Y, _G2Y, _B2Y = 4899, 9617, 1868        # 0.299, 0.587, 0.114 * 2**14
_B2U = 8061                                 # 0.492 * 2**14
_U2B, _U2G = 2.032, -0.395                  # OpenCV's YUV -> BGR factors of U - 128
_ROUND = 1 << (_SHIFT - 1)


def _rgb_to_u(rgb: np.ndarray) -> np.ndarray:
    """U of OpenCV's COLOR_BGR2YUV (int32, 0..255) from an (H, W, 3) RGB uint8 array."""
    r, g, b = np.moveaxis(rgb, -1, 0).astype(np.int32)   # planes: in-place integer ops below
    y = r * _R2Y
    y += g * _G2Y
    y += b * _B2Y
    y += _ROUND
    y >>= _SHIFT
    u = b - y
    u *= _B2U
    u += (128 << _SHIFT) + _ROUND
    u >>= _SHIFT
    return np.clip(u, 0, 255, out=u)


# ---------------------------------------------------------------------------------
# Blocks of the Haar approximation band
# ---------------------------------------------------------------------------------
_H = 0.7071067811865476   # pywt.Wavelet("haar").dec_lo[0] = 1 / sqrt(2)


def too_small(width: int, height: int) -> str | None:
    """Why an image of this size carries no watermark, or None when it can."""
    if width * height < MIN_PIXELS:
        return (f"{width}x{height} is under {MIN_PIXELS} pixels (256x256), the least the "
                "DWT-DCT watermark (invisible-watermark's dwtDct) reads or writes")
    n_blocks = (height // 8) * (width // 8)
    if n_blocks < 8 * len(_bits(MESSAGE)):
        return f"{width}x{height} has too few 8x8 blocks ({n_blocks}) for the watermark"
    return None


def _blocks(u: np.ndarray) -> np.ndarray:
    """U's one-level Haar approximation band (``pywt.dwt2(u, "haar")[0]`` bit for
    bit: rows first, then columns, each pair as ``a * h + b * h``, tested against
    pywt) cut into 4x4 blocks: an (N, 16) array, blocks numbered row by row, each
    block's coefficients row-major, as imwatermark walks them. Like imwatermark,
    U is first cropped to a multiple of 4 pixels and the band to a multiple of 4
    coefficients."""
    nr, nc = u.shape[0] // 8, u.shape[1] // 8
    x = u[:nr * 8, :nc * 8].astype(np.float64)
    rows = x[0::2] * _H + x[1::2] * _H
    ca = rows[:, 0::2] * _H + rows[:, 1::2] * _H
    return ca.reshape(nr, BLOCK, nc, BLOCK).transpose(0, 2, 1, 3).reshape(nr * nc, BLOCK * BLOCK)


def _chosen(blocks: np.ndarray) -> np.ndarray:
    """Index (1..15) of each block's largest-magnitude coefficient after the
    first; np.argmax keeps the first on ties, as imwatermark's does."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _votes(blocks: np.ndarray) -> np.ndarray:
    """Each block's bit (0/1), as imwatermark's infer_dct_matrix reads it."""
    val = np.abs(blocks[np.arange(len(blocks)), _chosen(blocks)])
    return (np.mod(val, SCALE) > 0.5 * SCALE).astype(np.uint8)


def _fractions(votes: np.ndarray, n_bits: int) -> np.ndarray:
    """Per message bit, the fraction of its blocks voting 1 (block k votes for bit k % n_bits)."""
    return np.array([votes[i::n_bits].mean() if len(votes[i::n_bits]) else 0.0 for i in range(n_bits)])


def _decide(fractions: np.ndarray) -> np.ndarray:
    # imwatermark: bits = (np.array(avgScores) * 255 > 127)
    return (fractions * 255 > 127).astype(np.uint8)


def _as_rgb_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise InvalidArgument(f"expected a PIL image, got {type(image).__name__}")
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def read_bits(image: Image.Image, n_bits: int) -> np.ndarray:
    """The ``n_bits`` message bits imwatermark's dwtDct decoder reads from ``image``."""
    return _decide(_fractions(_votes(_blocks(_rgb_to_u(_as_rgb_array(image)))), n_bits))


# ---------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------
def _levels(val: np.ndarray, floor: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two magnitudes each chosen coefficient may move to: the level of its bit,
    (k + 0.25 + 0.5 bit) * SCALE, nearest to ``val`` among those at or above
    ``floor`` (the block's next largest magnitude plus a margin, so the reader
    picks the same coefficient again), and the next level on the other side of
    ``val`` that is also above ``floor`` (used where clipping to 0..255 spoils
    the first)."""
    offset = 0.25 + 0.5 * bits
    k_min = np.maximum(np.ceil(floor / SCALE - offset), 0)
    k = np.maximum(np.rint(val / SCALE - offset), k_min)
    first = (k + offset) * SCALE
    other = np.where(first > val, k - 1, k + 1)
    other = np.where(other < k_min, k + 1, other)
    return first, (other + offset) * SCALE


def _move(rgb: np.ndarray, out: np.ndarray, idx: np.ndarray, nc: int, pos: np.ndarray,
          delta: np.ndarray) -> np.ndarray:
    """Write into ``out`` the 2x2 pixels under coefficient ``pos`` of each block
    ``idx``, changed so that the coefficient moves by ``delta``, and return that
    coefficient's new value as the reader will compute it.

    The Haar synthesis of a change d of an approximation coefficient moves each
    of its 2x2 pixels' U by d * h * h = d / 2; U -> RGB by OpenCV's YUV -> BGR
    factors (B += 2.032 dU, G -= 0.395 dU), rounded and clipped; R, and Y to
    0.03 %, stay."""
    rr = (idx // nc * BLOCK + pos // BLOCK)[:, None, None] * 2 + np.array([0, 1])[None, :, None]
    cc = (idx % nc * BLOCK + pos % BLOCK)[:, None, None] * 2 + np.array([0, 1])[None, None, :]
    px = rgb[rr, cc].astype(np.float64)                 # (N, 2, 2, 3)
    d_u = (delta * (_H * _H))[:, None, None]
    px[..., 2] += _U2B * d_u
    px[..., 1] += _U2G * d_u
    new = np.clip(np.rint(px), 0, 255).astype(np.uint8)
    out[rr, cc] = new
    u = _rgb_to_u(new).astype(np.float64)
    # the same arithmetic as _blocks: pixel rows first, then columns
    left = u[:, 0, 0] * _H + u[:, 1, 0] * _H
    right = u[:, 0, 1] * _H + u[:, 1, 1] * _H
    return left * _H + right * _H


def embed(image: Image.Image, message: bytes = MESSAGE, luma: bool = True) -> Image.Image:
    """``image`` with ``message`` embedded (a new RGB image of the same size): in the
    luma mark (unless ``luma`` is false), then in the DWT-DCT mark.

    Raises :class:`InvalidArgument` for an image too small to carry it
    (:func:`too_small`) or an empty message.
    """
    if not message:
        raise InvalidArgument("the watermark message is empty")
    rgb = _as_rgb_array(image)
    h, w = rgb.shape[:2]
    reason = too_small(w, h)
    if reason:
        raise InvalidArgument(f"cannot watermark this image: {reason}")
    bits = _bits(message)
    if luma:
        rgb = embed_luma(rgb, bits)
    blocks = _blocks(_rgb_to_u(rgb))
    n, nc = len(blocks), w // 8
    idx = np.arange(n)
    want = bits[idx % len(bits)]
    pos = _chosen(blocks)
    signed = blocks[idx, pos]
    mags = np.abs(blocks[:, 1:])
    mags[idx, pos - 1] = -np.inf
    # Margin 2: rounding to uint8 and the integer YUV conversion move a
    # coefficient by about 1, and a tie would go to the earlier coefficient.
    first, other = _levels(np.abs(signed), mags.max(axis=1) + 2.0, want)
    sign = np.where(signed < 0, -1.0, 1.0)
    out = rgb.copy()
    moved = blocks.copy()
    moved[idx, pos] = _move(rgb, out, idx, nc, pos, sign * first - signed)
    # Where clipping to 0..255 kept a block from its bit (the reader's view of
    # the moved block disagrees), try the level on the other side once.
    wrong = np.flatnonzero(_votes(moved) != want)
    if len(wrong):
        _move(rgb, out, wrong, nc, pos[wrong], sign[wrong] * other[wrong] - signed[wrong])
    return Image.fromarray(out, mode="RGB")


# ---------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------
#: The marks :func:`detect` reads, as Found.marks names them.
DWTDCT, LUMA = "dwtDct", "luma"


@dataclass(frozen=True)
class Found:
    """A watermark read from an image."""

    name: str          # who writes it: "cpuflow 0.1", "Stable Diffusion 2 scripts (SDV2)", ...
    message: bytes     # the message as bytes
    agreement: float   # share of the blocks of marks[0] that vote for the message's bits (1.0: untouched)
    # the marks that read the message, each with its agreement: ("dwtDct", a) (imwatermark's chroma
    # mark) and / or ("luma", a) (cpuflow's own, which survives a 4:2:0 JPEG)
    marks: tuple[tuple[str, float], ...] = ()


def _agreement(votes: np.ndarray, bits: np.ndarray) -> float:
    expected = bits[np.arange(len(votes)) % len(bits)]
    return float((votes == expected).mean())


def _name_cpuflow(message: bytes) -> str | None:
    if len(message) == 4 and message[:2] == b"cf" and message[2:].isdigit():
        return f"cpuflow {chr(message[2])}.{chr(message[3])}"
    return None


def detect(image: Image.Image) -> Found | None:
    """The known watermark ``image`` carries (cpuflow's, any version, in either of
    its marks; the Stable Diffusion 1 and 2 scripts'; SDXL's), or None.

    A message must be read exactly: every one of its bits, each decided by the
    majority of its blocks (in the DWT-DCT mark as imwatermark decides it; in the
    luma mark by their weighted soft votes). An unmarked image reads as cpuflow's
    by chance about once in 40 million per mark (24 fixed bits and two digits),
    once in 20 million for the two.
    """
    rgb = _as_rgb_array(image)
    if too_small(rgb.shape[1], rgb.shape[0]):
        return None
    votes = _votes(_blocks(_rgb_to_u(rgb)))
    bits32 = _decide(_fractions(votes, 32))
    message = np.packbits(bits32).tobytes()
    luma_bits, luma_votes, luma_bit_of = read_luma(rgb, 32)
    luma_message = np.packbits(luma_bits).tobytes()
    luma = ((LUMA, float((luma_votes == luma_bits[luma_bit_of]).mean())),)
    name = _name_cpuflow(message)
    if name:
        agreement = _agreement(votes, bits32)
        marks = ((DWTDCT, agreement),) + (luma if luma_message == message else ())
        return Found(name, message, agreement, marks)
    name = _name_cpuflow(luma_message)
    if name:
        return Found(name, luma_message, luma[0][1], luma)
    for name, bits in _KNOWN:
        read = bits32 if len(bits) == 32 else _decide(_fractions(votes, len(bits)))
        if np.array_equal(read, bits):
            agreement = _agreement(votes, bits)
            return Found(name, np.packbits(bits).tobytes(), agreement, ((DWTDCT, agreement),))
    return None


# ---------------------------------------------------------------------------------
# What the pipelines call
# ---------------------------------------------------------------------------------
def apply(image: Image.Image, enabled: bool = True) -> tuple[Image.Image, str]:
    """Mark ``image`` when ``enabled`` and it is large enough. Returns the image
    and what the PNG metadata records under ``watermark``: ``"dwtDct cf01"``
    (on, with the message), ``"off"`` or ``"skipped: <reason>"``."""
    if not enabled:
        return image, "off"
    reason = too_small(*image.size)
    if reason:
        return image, f"skipped: {reason}"
    return embed(image), f"dwtDct {MESSAGE.decode('ascii')}"
