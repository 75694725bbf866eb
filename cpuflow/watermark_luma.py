"""cpuflow's second, luma-borne watermark: the one that survives an ordinary JPEG.

The DWT-DCT mark (cpuflow/watermark.py, imwatermark's method) lives in the U chroma
of 2x2-pixel groups, which JPEG's usual 4:2:0 chroma subsampling wipes. This mark
carries the same message in the luma Y = 0.299 R + 0.587 G + 0.114 B (BT.601, the
Y of JPEG's JFIF colour space), which JPEG keeps at full resolution, in the place
JPEG keeps best: the mean (the DC coefficient) of each 8x8 block on JPEG's own
grid (blocks start at pixel 0, 0, as a JPEG encoder cuts them). A JPEG at quality
q quantises that DC with step 16 * (200 - 2q) / 100 / 8 grey levels on the block
mean (0.375 at q90, 0.75 at q80; libjpeg's scaled standard luminance table), and
subsampled chroma does not touch it.

* Embedding: dithered quantisation index modulation (QIM; Chen & Wornell, "Quantization
  index modulation", IEEE Trans. Inf. Theory 47(4), 2001). Block k's mean is moved to
  the nearest point of ``d_k + STEP * (Z + bit / 2)``, where ``d_k`` is a fixed
  pseudo-random dither (so that flat or regular pictures do not read as a message) and
  the bit is the message bit that a fixed pseudo-random permutation gives the block
  (so that a damaged region spreads its errors over all bits). The shift is spread
  over the block by a half-sine window (mean 1) and added to R, G and B alike: Y moves
  by it, U and V (differences to Y) do not, so the DWT-DCT mark written afterwards,
  and what imwatermark reads, are unaffected. Pixels are
  rounded against an 8x8 ordered-dither threshold so that a fractional shift of a
  flat block is kept on average (plain rounding would move a flat block by 0 or 1).
* Reading: each block's mean, its phase against its dither gives a soft vote
  ``cos(2 pi (mean - d_k) / STEP)`` (+1: bit 0, -1: bit 1), weighted down where pixels
  clip; a message bit is the sign of the weighted sum of its blocks' votes.
"""
from __future__ import annotations

import numpy as np

__all__ = ["STEP", "embed_luma", "read_luma"]

#: QIM step on the 8x8 block mean, in grey levels (bits 0 and 1 lie STEP / 2 apart;
#: a block is misread when JPEG moves its mean by more than STEP / 4). Chosen by
#: measurement (bench/watermark_robustness.py, README): on its 50 images, step 2 / 2.5 / 3
#: read JPEG 90 at 4:2:0 on 50 / 50 / 50, JPEG 80 on 48 / 49 / 50, JPEG 70 on 46 / 48 / 49;
#: PSNR median with both marks 38.5 / 38.4 / 38.3 dB (the DWT-DCT mark alone: 38.8); 3
#: leaves faint 8x8 patches in flat bright areas when enlarged.
STEP = 2.5
BLOCK = 8
_KEY = 0x6366_6C75   # "cflu": the dither and the bit permutation derive from it

# BT.601 luma (JPEG's JFIF Y); the weights sum to 1, so adding s to R, G and B adds s to Y.
# float32 throughout the pixel work: plenty (block means to 0.001 grey levels), twice as fast as float64.
_Y = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# 8x8 Bayer matrix, thresholds (i + 0.5) / 64: the ordered dither of the rounding.
_B2 = np.array([[0, 2], [3, 1]])
_B8 = _B2
for _ in range(2):
    _B8 = np.block([[4 * _B8 + 0, 4 * _B8 + 2], [4 * _B8 + 3, 4 * _B8 + 1]])
_THRESH = ((_B8 + 0.5) / 64.0).astype(np.float32)
# How a block's shift is spread over its pixels: 0.5 + 0.5 sin(pi (i + 0.5) / 8) along rows
# and columns, scaled to mean 1 (so the block mean moves by the shift): 0.53 of it at the corners,
# 1.46 at the centre. A flat shift (the least squared error for a given mean) leaves a faint
# 8x8 grid in flat bright areas, seen enlarged; this one, 0.3 dB dearer, softens the block edges.
_HALF_SINE = 0.5 + 0.5 * np.sin(np.pi * (np.arange(BLOCK) + 0.5) / BLOCK)
_WINDOW = (np.outer(_HALF_SINE, _HALF_SINE) / np.outer(_HALF_SINE, _HALF_SINE).mean()).astype(np.float32)


def _layout(nr: int, nc: int, n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For an nr x nc grid of blocks: each block's dither (0..1, times STEP) and its message bit."""
    rng = np.random.default_rng([_KEY, nr, nc])
    n = nr * nc
    dither = rng.random(n)
    bit_of = rng.permutation(n) % n_bits
    return dither, bit_of


def _block_sums(x: np.ndarray, nr: int, nc: int) -> np.ndarray:
    """Sums of the 8x8 blocks of a 2-D array (cropped to whole blocks), row by row: (nr * nc,)."""
    x = x[:nr * BLOCK, :nc * BLOCK]
    return x.reshape(nr * BLOCK, nc, BLOCK).sum(-1).reshape(nr, BLOCK, nc).sum(1).ravel()


def _block_means(rgb: np.ndarray) -> np.ndarray:
    nr, nc = rgb.shape[0] // BLOCK, rgb.shape[1] // BLOCK
    y = rgb[:nr * BLOCK, :nc * BLOCK].astype(np.float32) @ _Y     # Y of every pixel
    return _block_sums(y, nr, nc) / (BLOCK * BLOCK)


def _phase(means: np.ndarray, dither: np.ndarray, step: float) -> np.ndarray:
    """Position of each mean within its quantiser cell, 0..1 (0: bit 0's lattice, 0.5: bit 1's)."""
    return np.mod(means / step - dither, 1.0)


def read_luma(rgb: np.ndarray, n_bits: int,
              step: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_bits`` bits the luma mark of an (H, W, 3) uint8 RGB array reads, each block's
    hard vote, and the bit each block carries (the last two for an agreement figure).
    ``step``: STEP unless given (read at call time, so a measurement can vary it)."""
    step = STEP if step is None else step
    nr, nc = rgb.shape[0] // BLOCK, rgb.shape[1] // BLOCK
    dither, bit_of = _layout(nr, nc, n_bits)
    soft = np.cos(2 * np.pi * _phase(_block_means(rgb), dither, step))
    # A decoded JPEG's R, G, B are its Y plus the (4:2:0: smoothed) chroma, clipped to 0..255;
    # where a channel clipped, Y recomputed from them is off by up to several grey levels. Such
    # blocks vote with weight (share of unclipped pixels) ** 4 (measured: with weight 1, the most
    # saturated textures of bench/watermark_robustness.py lose the message at JPEG 90), plus 0.01
    # so that a picture clipped everywhere (pure blue, as written: exact) still reads.
    wrapped = rgb[:nr * BLOCK, :nc * BLOCK] + np.uint8(1)   # uint8: 255 -> 0, 0 -> 1
    clipped = np.minimum(np.minimum(wrapped[..., 0], wrapped[..., 1]), wrapped[..., 2]) <= 1
    weight = (1.0 - _block_sums(clipped, nr, nc) / (BLOCK * BLOCK)) ** 4 + 0.01
    sums = np.bincount(bit_of, weights=soft * weight, minlength=n_bits)
    return (sums < 0).astype(np.uint8), (soft < 0).astype(np.uint8), bit_of


def _shifted(px: np.ndarray, shift: np.ndarray, thresh: np.ndarray) -> np.ndarray:
    """Pixels ``px`` (uint8, RGB last) moved by ``shift`` grey levels (per pixel), R, G and B
    alike, rounded against the ordered-dither ``thresh`` (floor(x + shift + thresh) for integer
    x) and clipped.
    ``shift`` and ``thresh`` broadcast against ``px`` without its RGB axis."""
    whole = np.floor(shift)
    add = (whole + (shift - whole + thresh >= 1.0)).astype(np.int16)
    res = px.astype(np.int16)
    res += add[..., None]
    return np.clip(res, 0, 255, out=res).astype(np.uint8)


def embed_luma(rgb: np.ndarray, bits: np.ndarray, step: float | None = None) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 RGB array ``rgb`` carrying ``bits`` in its luma
    (``step``: STEP unless given)."""
    step = STEP if step is None else step
    nr, nc = rgb.shape[0] // BLOCK, rgb.shape[1] // BLOCK
    dither, bit_of = _layout(nr, nc, len(bits))
    want = bits[bit_of].astype(np.float64)
    means = _block_means(rgb)
    # nearest point of dither + step * (Z + want / 2)
    offset = (dither + 0.5 * want) * step
    target = np.rint((means - offset) / step) * step + offset
    h, w = nr * BLOCK, nc * BLOCK
    original = np.ascontiguousarray(rgb[:h, :w]).reshape(nr, BLOCK, nc, BLOCK, 3)   # blocks, axes 0 and 2
    shift = (target - means).astype(np.float32).reshape(nr, 1, nc, 1) * _WINDOW[None, :, None, :]
    blocks = _shifted(original, shift, _THRESH[None, :, None, :])
    # Where clipping at 0 or 255 kept a block more than STEP / 8 from its point (half of
    # the reader's margin), aim at the point of the same bit on the other side once.
    got = _block_means(blocks.reshape(h, w, 3))
    wrong = np.flatnonzero(np.abs(np.mod((got - target) / step + 0.5, 1.0) - 0.5) > 0.125)
    if len(wrong):
        other = np.where(target > means, target - step, target + step)[wrong]
        r, c = wrong // nc, wrong % nc
        shift = (other - means[wrong]).astype(np.float32)[:, None, None] * _WINDOW[None]
        blocks[r, :, c] = _shifted(original[r, :, c], shift, _THRESH[None])
    out = rgb.copy()                   # pixels past the last whole block stay as they were
    out[:h, :w] = blocks.reshape(h, w, 3)
    return out
