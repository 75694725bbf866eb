"""cpuflow's luma watermark (cpuflow/watermark_luma.py): the second mark, which survives an
ordinary JPEG (Pillow's default 4:2:0 chroma subsampling wipes the DWT-DCT chroma mark), and
leaves the DWT-DCT mark (what imwatermark reads, tests/test_watermark.py) as it was."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow import watermark as wm
from cpuflow import watermark_luma as wl
from cpuflow.cli import main
from tests.helpers_images import psnr, texture

BITS = wm._bits(wm.MESSAGE)


def _jpeg(img: Image.Image, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("seed,size", [(0, 256), (1, 512), (3, 256), (5, 512)])   # seed 5: a fifth clips
def test_jpeg_90_with_chroma_subsampling_is_read_by_the_luma_mark(seed, size):
    img = texture(seed, size)
    marked = wm.embed(img)
    assert psnr(img, marked) >= 35.0
    for quality in (90, 80):
        found = wm.detect(_jpeg(marked, quality=quality))          # Pillow's default: 4:2:0
        assert found is not None and found.message == wm.MESSAGE and found.name == "cpuflow 0.1"
        # it is the luma mark that read it: 4:2:0 wiped the chroma one
        assert [m for m, _ in found.marks] == [wm.LUMA]
    # without the luma mark, the same JPEG carries nothing (the limit the luma mark lifts)
    assert wm.detect(_jpeg(wm.embed(img, luma=False), quality=90)) is None
    # as written, both marks read it
    assert [m for m, _ in wm.detect(marked).marks] == [wm.DWTDCT, wm.LUMA]


def test_unmarked_images_are_not_detected():
    pictures = [texture(s, 256) for s in range(4)] + [
        Image.new("RGB", (256, 256), c) for c in ((255, 255, 255), (128, 128, 128), (0, 0, 0))]
    for img in pictures:
        for test in (img, _jpeg(img, quality=90), _jpeg(img, quality=90, subsampling=0)):
            assert wm.detect(test) is None
            assert not np.array_equal(wl.read_luma(np.asarray(test), 32)[0], BITS)


def test_luma_mark_moves_grey_levels_and_keeps_chroma():
    # Where nothing clips: R, G and B move together by whole grey levels, at most the largest
    # shift (STEP / 2, to the nearest point of the bit's lattice) times the window's peak; U
    # (what the DWT-DCT mark and imwatermark read) is unchanged to the last bit; and every
    # block reads back its bit.
    a = np.asarray(texture(1, 256))
    a = np.clip(a, 8, 247)                  # no pixel near 0 or 255
    m = wl.embed_luma(a, BITS)
    d = m.astype(int) - a.astype(int)
    assert (d[..., 0] == d[..., 1]).all() and (d[..., 1] == d[..., 2]).all()
    assert np.abs(d).max() <= np.ceil(wl.STEP / 2 * wl._WINDOW.max())
    assert np.array_equal(wm._rgb_to_u(m), wm._rgb_to_u(a))
    bits, votes, bit_of = wl.read_luma(m, 32)
    assert np.array_equal(bits, BITS) and (votes == BITS[bit_of]).all()
    # the cost of the luma mark alone: mean squared change about STEP ** 2 / 12
    assert psnr(a, m) >= 45.0


def test_sizes_not_a_multiple_of_8():
    # JPEG's grid starts at the top-left pixel whatever the size; the pixels past the last whole
    # block are left as they were
    img = texture(1, 512).crop((0, 0, 300, 262))
    marked = wm.embed(img)
    a = np.asarray(img)
    luma = wl.embed_luma(a, BITS)
    assert np.array_equal(luma[256:], a[256:]) and np.array_equal(luma[:, 296:], a[:, 296:])
    assert not np.array_equal(luma[:256, :296], a[:256, :296])
    found = wm.detect(_jpeg(marked, quality=90))
    assert found.message == wm.MESSAGE and [m for m, _ in found.marks] == [wm.LUMA]


def test_flat_white_carries_the_luma_mark():
    # the DWT-DCT mark cannot live in pure white (blue would have to exceed 255); the luma mark
    # moves such blocks down
    white = Image.new("RGB", (256, 256), (255, 255, 255))
    marked = wm.embed(white)
    for test in (marked, _jpeg(marked, quality=90)):
        found = wm.detect(test)
        assert found.message == wm.MESSAGE and [m for m, _ in found.marks] == [wm.LUMA]


def test_cli_says_which_mark_read_it(tmp_path):
    marked = wm.embed(texture(0, 256))
    marked.save(tmp_path / "marked.png")
    marked.save(tmp_path / "marked.jpg", quality=90)
    texture(0, 256).save(tmp_path / "plain.jpg", quality=90)
    names = ("marked.png", "marked.jpg", "plain.jpg")
    r = CliRunner().invoke(main, ["watermark"] + [str(tmp_path / n) for n in names])
    assert r.exit_code == 0, r.output
    png, jpg, plain = r.output.strip().splitlines()
    assert ("cpuflow 0.1 (message b'cf01'; DWT-DCT chroma mark: 100% of its 8x8 blocks agree; "
            "luma mark: 100%") in png
    assert "cpuflow 0.1 (message b'cf01'; luma mark: " in jpg and "DWT-DCT" not in jpg
    assert plain.endswith("plain.jpg: no watermark found")
