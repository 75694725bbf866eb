"""The invisible watermark (cpuflow/watermark.py) and `cpuflow watermark`.

Compatibility with the `invisible-watermark` package (imwatermark, method dwtDct) both ways:
cpuflow's marks are read by imwatermark.WatermarkDecoder, and imwatermark.WatermarkEncoder's
marks are found by `cpuflow watermark`. imwatermark and OpenCV are test dependencies only
(the runtime has neither)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow import watermark as wm
from cpuflow.cli import main
from cpuflow.errors import InvalidArgument
from tests.helpers_images import psnr, texture


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="needs opencv-python-headless (test extra)")


@pytest.fixture(scope="module")
def imwatermark(cv2):
    # installed by scripts/setup-dev.sh with --no-deps (it asks for opencv-python, not headless)
    return pytest.importorskip("imwatermark", reason="needs invisible-watermark (scripts/setup-dev.sh)")

SIZE = 256      # the least that carries a mark: keeps the tests fast


def _bgr(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def _their_mark(img: Image.Image, kind: str, content) -> Image.Image:
    import imwatermark
    enc = imwatermark.WatermarkEncoder()
    enc.set_watermark(kind, content)
    return Image.fromarray(np.ascontiguousarray(enc.encode(_bgr(img), "dwtDct")[:, :, ::-1]))


def test_message_names_cpuflow_and_its_version():
    assert wm.message_for_version("0.1.0") == b"cf01"
    assert wm.message_for_version("2.13.1rc1") == b"cf23"
    assert wm.MESSAGE == wm.message_for_version()
    assert len(wm.MESSAGE) * 8 == 32


def test_u_equals_opencv_bgr2yuv_on_every_colour(cv2):
    a = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(a >> 16) & 255, (a >> 8) & 255, a & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    ref = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)[:, :, 1]
    assert np.array_equal(wm._rgb_to_u(rgb), ref)


@pytest.mark.parametrize("levels", [2, 5, 256])
def test_haar_blocks_equal_pywt_bit_for_bit(levels):
    # Ties between coefficients decide which one the reader takes: the numpy Haar must give
    # pywt's floats exactly (few grey levels make many ties).
    pywt = pytest.importorskip("pywt")
    rng = np.random.default_rng(levels)
    u = rng.integers(0, levels, (260, 300)).astype(np.int32) * (255 // max(levels - 1, 1))
    ca = pywt.dwt2(u[:260 // 4 * 4, :300 // 4 * 4].astype(np.float64), "haar")[0]
    nr, nc = ca.shape[0] // 4, ca.shape[1] // 4
    ref = ca[:nr * 4, :nc * 4].reshape(nr, 4, nc, 4).transpose(0, 2, 1, 3).reshape(nr * nc, 16)
    assert np.array_equal(wm._blocks(u), ref)


@pytest.mark.parametrize("n_bits", [32, 48, 136])
def test_read_bits_equal_imwatermark_decoder(n_bits, imwatermark):
    for img in (texture(1, SIZE), texture(2, 264), _their_mark(texture(3, SIZE), "bytes", b"SDV2"),
                Image.new("RGB", (SIZE, SIZE), (255, 255, 255))):
        ref = imwatermark.WatermarkDecoder("bits", n_bits).decode(_bgr(img), "dwtDct")
        assert wm.read_bits(img, n_bits).tolist() == [int(b) for b in ref]


def test_cpuflow_mark_is_decoded_by_imwatermark(tmp_path, cv2, imwatermark):
    for seed in (0, 1, 2):
        img = texture(seed, SIZE)
        marked = wm.embed(img)
        assert marked.size == img.size and marked.mode == "RGB"
        path = tmp_path / f"marked{seed}.png"
        marked.save(path)
        bgr = cv2.imread(str(path))             # as a user of imwatermark reads a file
        assert imwatermark.WatermarkDecoder("bytes", 32).decode(bgr, "dwtDct") == wm.MESSAGE
        assert wm.detect(marked).name == "cpuflow 0.1"
        # the unmarked original reads as something else
        assert imwatermark.WatermarkDecoder("bytes", 32).decode(_bgr(img), "dwtDct") != wm.MESSAGE
        assert wm.detect(img) is None


def test_imwatermark_marks_are_found_by_cpuflow_watermark(tmp_path, cv2, imwatermark):
    # imwatermark's encoder does not always mark an image so that its own decoder reads it back
    # (at 256x256 most of these textures fail); texture 3 is one it marks well. Its decoder
    # reading each mark back is checked first: cpuflow must find what imwatermark finds.
    base, bigger = texture(3, SIZE), texture(3, 384)
    sdxl_bits = [int(b) for b in bin(0b101100111110110010010000011110111011000110011110)[2:]]
    cases = [
        ("ours.png", base, "bytes", wm.MESSAGE, "cpuflow 0.1 (message b'cf01'"),
        ("sdv2.png", base, "bytes", b"SDV2", "Stable Diffusion 2 scripts (SDV2)"),
        ("sd1.png", bigger, "bytes", b"StableDiffusionV1", "Stable Diffusion 1 scripts"),
        ("sdxl.png", base, "bits", sdxl_bits, "SDXL"),
        ("plain.png", base, None, None, "no watermark found"),
    ]
    for name, img, kind, content, _ in cases:
        if kind is not None:
            img = _their_mark(img, kind, content)
            n = len(content) * (8 if kind == "bytes" else 1)
            read = imwatermark.WatermarkDecoder(kind, n).decode(_bgr(img), "dwtDct")
            assert [int(b) for b in read] == [int(b) for b in content] if kind == "bits" else read == content
        cv2.imwrite(str(tmp_path / name), _bgr(img))
    result = CliRunner().invoke(main, ["watermark"] + [str(tmp_path / c[0]) for c in cases])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(cases)
    for line, case in zip(lines, cases):
        assert line.startswith(f"{tmp_path / case[0]}: ") and case[-1] in line, line


def test_embedding_costs_little_and_survives_png(tmp_path):
    for seed in range(6):
        img = texture(seed, SIZE)
        marked = wm.embed(img)
        assert psnr(img, marked) >= 35.0
        # the DWT-DCT mark alone changes only the 2x2 pixels under one coefficient per 8x8 block
        # (the luma mark, on by default, moves every block: tests/test_watermark_luma.py)
        changed = (np.asarray(img) != np.asarray(wm.embed(img, luma=False))).any(-1)
        assert changed.mean() <= 1 / 16
        buf = io.BytesIO()
        marked.save(buf, format="PNG")
        assert wm.detect(Image.open(buf)).message == wm.MESSAGE


def test_mark_survives_jpeg_without_chroma_subsampling():
    # DWT-DCT lives in the chroma: JPEG's default 4:2:0 subsampling (with the decoder's
    # smoothing upsampling) wipes it (README); at 4:4:4 quality 90 it survives.
    for seed in (0, 1):
        buf = io.BytesIO()
        wm.embed(texture(seed, 512)).save(buf, format="JPEG", quality=90, subsampling=0)
        found = wm.detect(Image.open(buf))
        # the DWT-DCT mark itself (the luma mark reads it too: tests/test_watermark_luma.py)
        assert found.message == wm.MESSAGE and found.marks[0][0] == wm.DWTDCT


def test_small_images_are_skipped_with_a_reason():
    small = texture(0, 64)
    out, status = wm.apply(small)
    assert out is small and status.startswith("skipped: 64x64 is under 65536 pixels")
    with pytest.raises(InvalidArgument, match="cannot watermark this image: 64x64"):
        wm.embed(small)
    assert wm.detect(small) is None
    assert wm.too_small(256, 256) is None and wm.too_small(255, 256)
    assert wm.too_small(16384, 4)           # enough pixels, no 8x8 block


def test_apply_on_and_off():
    img = texture(1, SIZE)
    out, status = wm.apply(img, enabled=False)
    assert out is img and status == "off"
    out, status = wm.apply(img)
    assert status == "dwtDct cf01" and wm.detect(out).message == b"cf01"


def test_cli_small_and_bad_files(tmp_path):
    texture(0, 64).save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("1", (5000, 4000)).save(tmp_path / "huge.png")     # 20 M pixels, a few kB on disk
    runner = CliRunner()
    result = runner.invoke(main, ["watermark", str(tmp_path / "small.png")])
    assert result.exit_code == 0
    assert "no watermark found (too small to carry one: 64x64 is under 65536 pixels" in result.output
    for bad, words in (("notes.png", "is not an image"), ("missing.png", "does not exist"),
                       ("huge.png", "above the limit of 16777216")):
        result = runner.invoke(main, ["watermark", str(tmp_path / bad)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
        assert "Traceback" not in result.output
    # a bad file does not stop the others
    result = runner.invoke(main, ["watermark", str(tmp_path / "notes.png"), str(tmp_path / "small.png")])
    assert result.exit_code == 2 and "small.png: no watermark found" in result.output


# --- wiring: every image cpuflow writes carries the mark unless told not to ------------------------
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def shipped():
    from cpuflow import Pipeline
    with Pipeline.load(None, backend="onnxruntime", threads=2) as pipe:
        yield pipe


def test_python_api_marks_by_default_and_not_with_watermark_false(shipped):
    on = shipped.txt2img(PROMPT, steps=2, width=256, height=256, seed=3)
    off = shipped.txt2img(PROMPT, steps=2, width=256, height=256, seed=3, watermark=False)
    assert on.records[0]["watermark"] == "dwtDct cf01" and off.records[0]["watermark"] == "off"
    assert wm.detect(on.images[0]).message == b"cf01"
    assert wm.detect(off.images[0]) is None
    # the mark is all that differs, and it costs little
    assert 35.0 <= psnr(on.images[0], off.images[0]) < float("inf")
    small = shipped.txt2img(PROMPT, steps=2, seed=3)              # the model's own 64x64
    assert small.records[0]["watermark"].startswith("skipped: 64x64 is under 65536 pixels")
    with pytest.raises(InvalidArgument, match="watermark must be true or false"):
        shipped.txt2img(PROMPT, steps=2, watermark="no")


def test_cli_generate_marks_png_grid_and_jpeg_and_records_it(tmp_path):
    from cpuflow.image import read_png_metadata
    runner = CliRunner()
    base = ["generate", PROMPT, "--backend", "onnxruntime", "--steps", "2", "--seed", "3", "-W", "256", "-H", "256", "-q"]
    r = runner.invoke(main, base + ["--n-samples", "2", "--grid", "--out", str(tmp_path / "on.png")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, base + ["--out", str(tmp_path / "on.jpg")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, base + ["--no-watermark", "--out", str(tmp_path / "off.png")])
    assert r.exit_code == 0, r.output
    marked = ["on-00000.png", "on-00001.png", "on-00000-grid.png"]
    for name in marked:
        assert read_png_metadata(tmp_path / name)["watermark"] == "dwtDct cf01"
    assert read_png_metadata(tmp_path / "off.png")["watermark"] == "off"
    r = runner.invoke(main, ["watermark"] + [str(tmp_path / n) for n in marked + ["on.jpg", "off.png"]])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert all("cpuflow 0.1 (message b'cf01'" in line for line in lines[:4]), lines
    assert lines[4].endswith("off.png: no watermark found")
