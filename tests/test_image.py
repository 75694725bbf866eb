"""cpuflow.image: init images in, decoded images and PNG files out (reliability items 11, 13, 14, 21).

All test images are made in-process with PIL; nothing is downloaded.
"""
from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from cpuflow import image as cimg
from cpuflow.errors import ImageInputError, InvalidArgument, NumericalError, ResourceLimitError


# --- helpers -------------------------------------------------------------------
def _gradient(w: int, h: int) -> Image.Image:
    x = np.arange(w, dtype=np.uint16)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.uint16)[:, None].repeat(w, 1)
    a = np.stack([(x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _save(img: Image.Image, path, fmt: str, **kw):
    img.save(path, format=fmt, **kw)
    return path


def _png_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _patch_ihdr(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR size of a PNG and fix its CRC: a header that lies."""
    assert png[12:16] == b"IHDR"
    data = bytearray(png)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# --- formats -------------------------------------------------------------------
LOSSLESS = [("PNG", ".png", {}), ("BMP", ".bmp", {}), ("TIFF", ".tif", {}),
            ("WEBP", ".webp", {"lossless": True})]


@pytest.mark.parametrize("fmt,ext,kw", LOSSLESS)
def test_lossless_formats_exact(tmp_path, fmt, ext, kw):
    src = _gradient(40, 24)
    p = _save(src, tmp_path / f"in{ext}", fmt, **kw)
    out = cimg.load_init_image(p, None, None)
    assert out.mode == "RGB" and out.size == (40, 24)
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_jpeg_and_gif(tmp_path):
    src = _gradient(40, 24)
    out = cimg.load_init_image(_save(src, tmp_path / "a.jpg", "JPEG", quality=95), None, None)
    assert out.mode == "RGB" and out.size == (40, 24)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(src, np.int16)).mean() < 6
    flat = Image.new("RGB", (16, 8), (200, 40, 10))
    out = cimg.load_init_image(_save(flat, tmp_path / "a.gif", "GIF"), None, None)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (200, 40, 10)


def test_bytes_and_stream_sources(tmp_path):
    src = _gradient(16, 16)
    data = _png_bytes(src)
    assert np.array_equal(np.asarray(cimg.load_init_image(data, None, None)), np.asarray(src))
    stream = io.BytesIO(data)
    assert np.array_equal(np.asarray(cimg.load_init_image(stream, 16, 16)), np.asarray(src))
    assert not stream.closed  # the caller's stream is the caller's to close


# --- conversions -----------------------------------------------------------------
def test_exif_orientation_6_rotates(tmp_path):
    # 32 wide x 16 tall: left half red, right half blue. Orientation 6 = rotate 90 CW
    # to display, so the result is 16 wide x 32 tall with red on top.
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(a).save(p, "JPEG", exif=exif.tobytes(), quality=95)
    out = cimg.load_init_image(p, None, None)
    assert out.size == (16, 32)
    top, bottom = np.asarray(out)[4, 8].astype(int), np.asarray(out)[28, 8].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_composited_over_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 0)          # fully transparent black -> white
    a[0, 1] = (255, 0, 0, 255)      # opaque red stays red
    a[0, 2] = (0, 0, 0, 128)        # half-transparent black -> mid grey
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    out = cimg.load_init_image(p, None, None)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))
    # LA too
    la = Image.new("LA", (8, 8), (0, 0))
    out = cimg.load_init_image(_png_bytes(la), None, None)
    assert out.getpixel((5, 5)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, "JPEG", quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = cimg.load_init_image(p, None, None)
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_16bit_png_scaled_not_clipped(tmp_path):
    a = np.zeros((8, 8), np.uint16)
    a[0, :5] = [0, 257, 32768, 65535, 65535 // 2]
    p = tmp_path / "16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    out = np.asarray(cimg.load_init_image(p, None, None))
    assert out[0, :5, 0].tolist() == [0, 1, 128, 255, 127]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # 16-bit TIFF goes the same way
    t = tmp_path / "16.tif"
    Image.fromarray(a).save(t)
    assert np.array_equal(np.asarray(cimg.load_init_image(t, None, None)), out)


def test_mode_i_and_f_conversions():
    i = Image.fromarray(np.array([[-5, 0, 65535, 10**6]] * 8, np.int32).repeat(2, 1))
    assert i.mode == "I"
    assert np.asarray(cimg._to_rgb(i))[0, ::2, 0].tolist() == [0, 0, 255, 255]
    f = Image.fromarray(np.array([[-1.0, 0.4, 127.5, 300.0, np.nan, 254.6, 1.0, 2.0]] * 8, np.float32))
    assert f.mode == "F"
    assert np.asarray(cimg._to_rgb(f))[0, :, 0].tolist() == [0, 0, 128, 255, 0, 255, 1, 2]


def test_palette_with_transparency(tmp_path):
    p_img = Image.new("P", (8, 8), 0)
    p_img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p_img.putpixel((1, 1), 1)
    p = tmp_path / "pal.png"
    p_img.save(p, transparency=0)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = cimg.load_init_image(p, None, None)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white
    assert out.getpixel((1, 1)) == (10, 200, 30)
    gif = tmp_path / "pal.gif"
    p_img.save(gif, transparency=0)
    assert cimg.load_init_image(gif, None, None).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as check:
        assert check.n_frames == 3
    out = cimg.load_init_image(p, None, None)
    assert out.getpixel((8, 8)) == (255, 0, 0)
    # animated PNG too
    ap = tmp_path / "anim.png"
    frames[1].save(ap, save_all=True, append_images=[frames[0], frames[2]], duration=50)
    assert cimg.load_init_image(ap, None, None).getpixel((8, 8)) == (0, 0, 255)


# --- bombs and broken files ----------------------------------------------------------
def test_decompression_bomb_rejected_from_header(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_patch_ihdr(_png_bytes(Image.new("RGB", (8, 8))), 100_000, 100_000))
    t0 = time.perf_counter()
    with pytest.raises(ResourceLimitError) as ei:
        cimg.load_init_image(p, 512, 512)
    assert time.perf_counter() - t0 < 2.0
    assert "bomb.png" in str(ei.value)
    # Above our budget but below Pillow's own limit: our header check catches it.
    p2 = tmp_path / "big.png"
    p2.write_bytes(_patch_ihdr(_png_bytes(Image.new("RGB", (8, 8))), 5000, 5000))
    with pytest.raises(ResourceLimitError, match="5000x5000"):
        cimg.load_init_image(p2, None, None)
    # Between Pillow's warning and error limits: no warning leaks, our error is raised.
    p3 = tmp_path / "warn.png"
    p3.write_bytes(_patch_ihdr(_png_bytes(Image.new("RGB", (8, 8))), 10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ResourceLimitError, match="10000x10000"):
            cimg.load_init_image(p3, None, None)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # The budget is a parameter.
    with pytest.raises(ResourceLimitError):
        cimg.load_init_image(_png_bytes(Image.new("RGB", (16, 16))), None, None, max_pixels=100)
    with pytest.raises(ResourceLimitError):
        cimg.load_init_image(_png_bytes(Image.new("RGB", (16, 16))), 64, 64, max_pixels=1000)
    assert cimg.MAX_INIT_PIXELS == 4096 * 4096


def test_truncated_files(tmp_path):
    src = Image.effect_noise((128, 128), 60).convert("RGB")
    png = _png_bytes(src)
    p = tmp_path / "cut.png"
    p.write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageInputError, match="truncated") as ei:
        cimg.load_init_image(p, None, None)
    assert "cut.png" in str(ei.value)
    b = io.BytesIO()
    src.save(b, "JPEG")
    j = tmp_path / "cut.jpg"
    j.write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    with pytest.raises(ImageInputError, match="truncated"):
        cimg.load_init_image(j, None, None)


def test_odd_sources():
    with pytest.raises(ImageInputError, match="cannot be accessed"):
        cimg.load_init_image("bad\x00name.png", None, None)
    with pytest.raises(ImageInputError, match="must be a path"):
        cimg.load_init_image(12345, None, None)
    with pytest.raises(ImageInputError, match="empty"):
        cimg.load_init_image(io.BytesIO(b""), None, None)


@pytest.mark.parametrize("case", ["empty", "random", "text", "missing", "directory", "empty_bytes"])
def test_non_images(tmp_path, case):
    rng = np.random.default_rng(0)
    if case == "empty":
        src = tmp_path / "empty.png"
        src.write_bytes(b"")
        what = "empty"
    elif case == "random":
        src = tmp_path / "noise.jpg"
        src.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        what = "not an image"
    elif case == "text":
        src = tmp_path / "notes.png"
        src.write_text("hello, I am not a picture\n" * 20)
        what = "not an image"
    elif case == "missing":
        src = tmp_path / "nope.png"
        what = "does not exist"
    elif case == "directory":
        src = tmp_path / "folder.png"
        src.mkdir()
        what = "directory"
    else:
        src = b""
        what = "empty"
    with pytest.raises(ImageInputError, match=what) as ei:
        cimg.load_init_image(src, None, None)
    if not isinstance(src, bytes):
        assert src.name in str(ei.value)


def test_unsupported_format_refused(tmp_path):
    # A valid image in a format outside the allow-list (PPM here) is refused.
    p = tmp_path / "x.ppm"
    Image.new("RGB", (8, 8)).save(p, "PPM")
    with pytest.raises(ImageInputError, match="supported format"):
        cimg.load_init_image(p, None, None)


def test_damaged_png_crc(tmp_path):
    data = bytearray(_png_bytes(_gradient(32, 32)))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(ImageInputError):
        cimg.load_init_image(bytes(data), None, None)


# --- sizes ------------------------------------------------------------------------
def test_resize_crop_deterministic_and_sizes(tmp_path):
    src = _gradient(100, 60)
    p = tmp_path / "s.png"
    src.save(p)
    a = cimg.load_init_image(p, 64, 64)
    b = cimg.load_init_image(p, 64, 64)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()
    assert cimg.load_init_image(p, 128, 32).size == (128, 32)
    # own size rounded down by a center crop, no resampling
    own = cimg.load_init_image(p, None, None)
    assert own.size == (96, 56)
    assert np.array_equal(np.asarray(own), np.asarray(src)[2:58, 2:98])
    # only one side given: the other follows the aspect ratio, rounded down to /8
    assert cimg.load_init_image(p, 80, None).size == (80, 48)
    assert cimg.load_init_image(p, None, 40).size == (64, 40)
    # tiny images are scaled up to 8
    assert cimg.load_init_image(_png_bytes(Image.new("RGB", (5, 3))), None, None).size == (8, 8)


def test_cover_then_center_crop():
    # wide image: 3 vertical bands; asking for a square keeps the middle band.
    a = np.zeros((64, 192, 3), np.uint8)
    a[:, :64] = (255, 0, 0)
    a[:, 64:128] = (0, 255, 0)
    a[:, 128:] = (0, 0, 255)
    out = np.asarray(cimg.load_init_image(_png_bytes(Image.fromarray(a)), 32, 32))
    assert out.shape == (32, 32, 3)
    # LANCZOS support at 2x reduction is 3 output pixels; inside that, pure green
    assert (out[:, 3:29] == (0, 255, 0)).all()
    assert out[:, 0, 0].mean() > out[:, 0, 2].mean()  # red side on the left, blue on the right
    assert out[:, -1, 2].mean() > out[:, -1, 0].mean()


@pytest.mark.parametrize("w", [30, 0, -8, 8.0, True, "64"])
def test_bad_width(w):
    with pytest.raises(InvalidArgument, match="width"):
        cimg.load_init_image(_png_bytes(Image.new("RGB", (8, 8))), w, 64)


# --- arrays ---------------------------------------------------------------------------
def test_image_to_array():
    a = np.zeros((8, 16, 3), np.uint8)
    a[0, 0] = (0, 255, 128)
    x = cimg.image_to_array(Image.fromarray(a))
    assert x.shape == (1, 3, 8, 16) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[0, :, 0, 0].tolist() == [-1.0, 1.0, np.float32(2.0) * np.float32(128 / 255.0) - 1.0]


def test_array_to_images_basic():
    x = np.linspace(-1.2, 1.2, 2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    imgs = cimg.array_to_images(x)
    assert len(imgs) == 2 and all(im.mode == "RGB" and im.size == (8, 8) for im in imgs)
    assert np.asarray(imgs[0])[0, 0, 0] == 0 and np.asarray(imgs[1])[-1, -1, -1] == 255
    # round trip through image_to_array is exact for 8-bit images
    src = _gradient(16, 8)
    assert np.array_equal(np.asarray(cimg.array_to_images(cimg.image_to_array(src))[0]), np.asarray(src))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_array_to_images_non_finite(bad):
    x = np.zeros((1, 3, 8, 8), np.float32)
    x[0, 1, 3, 4] = bad
    with pytest.raises(NumericalError, match="vae decode"):
        cimg.array_to_images(x)


def test_check_finite_names_stage():
    cimg.check_finite("latents", np.zeros(4, np.float32))
    cimg.check_finite("ints", np.arange(4))
    x = np.zeros((2, 4), np.float16)
    x[0, 0], x[1, 1] = np.nan, np.inf
    with pytest.raises(NumericalError, match=r"unet output at step 7: 1 NaN and 1 inf"):
        cimg.check_finite("unet output at step 7", x)


def test_array_to_images_matches_diffusers_bit_exact():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    rng = np.random.default_rng(1234)
    x = rng.normal(0, 0.6, (2, 3, 32, 32)).astype(np.float32)
    # values on the 8-bit rounding boundaries, where a different formula would differ
    k = np.arange(256 * 3, dtype=np.float32).reshape(1, 3, 16, 16) % 256
    edges = [(k + 0.5) / 255 * 2 - 1, k / 255 * 2 - 1, np.nextafter((k + 0.5) / 255 * 2 - 1, 0)]
    for arr in [x] + [np.ascontiguousarray(e, np.float32) for e in edges]:
        for dtype in (np.float32, np.float16):
            a = arr.astype(dtype)
            ref = proc.postprocess(torch.from_numpy(a), output_type="pil")
            ours = cimg.array_to_images(a)
            assert len(ours) == len(ref)
            for o, r in zip(ours, ref):
                assert o.mode == r.mode and o.tobytes() == r.tobytes()
    # and preprocess agrees with image_to_array
    src = _gradient(32, 24)
    ref = proc.preprocess(src).numpy()
    assert np.array_equal(cimg.image_to_array(src), ref)


# --- grid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,cols,size", [(1, None, (16, 8)), (3, None, (48, 8)), (4, None, (64, 8)),
                                         (5, None, (48, 16)), (9, None, (48, 24)),
                                         (6, 2, (32, 24)), (3, 10, (48, 8))])
def test_make_grid_sizes(n, cols, size):
    imgs = [Image.new("RGB", (16, 8), (i * 20, 0, 0)) for i in range(n)]
    g = cimg.make_grid(imgs, cols)
    assert g.size == size and g.mode == "RGB"
    c = cols or (n if n <= 4 else 3)
    c = min(c, n)
    last = n - 1
    assert g.getpixel(((last % c) * 16 + 1, (last // c) * 8 + 1)) == (last * 20, 0, 0)


def test_make_grid_bad():
    with pytest.raises(InvalidArgument):
        cimg.make_grid([])
    with pytest.raises(InvalidArgument):
        cimg.make_grid([Image.new("RGB", (8, 8))], cols=0)


# --- PNG metadata ----------------------------------------------------------------------------
PARAMS = {
    "prompt": "a red fox in snow, 雪の中の狐 🦊",
    "negative_prompt": "blurry, low quality",
    "seed": 42,
    "sampler": "euler_a",
    "schedule": "karras",
    "steps": 20,
    "guidance": 7.5,
    "width": 512,
    "height": 512,
    "model_name": "sd15",
    "model_hash": "abcd1234567890ef",
    "backend": "onnxruntime",
    "device": "cpu",
    "precision": "fp32",
    "variant": "fp32",
    "strength": 0.75,
    "cpuflow_version": "0.1.0",
}


def test_a1111_parameters_text():
    text = cimg.a1111_parameters(PARAMS)
    assert text == (
        "a red fox in snow, 雪の中の狐 🦊\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 512x512, Model hash: abcd123456, Model: sd15, Denoising strength: 0.75, "
        "Version: cpuflow 0.1.0"
    )
    back = cimg.parse_a1111_parameters(text)
    for k in ("prompt", "negative_prompt", "seed", "sampler", "schedule", "steps", "guidance",
              "width", "height", "model_name", "strength", "cpuflow_version"):
        assert back[k] == PARAMS[k], k
    assert back["model_hash"] == "abcd123456"
    # no negative prompt line when empty; values with commas are quoted as A1111 does
    t2 = cimg.a1111_parameters({"prompt": "x", "steps": 4, "sampler": "lcm", "schedule": "default",
                                "model_name": "a, b"})
    assert t2.split("\n")[1].startswith("Steps: 4, Sampler: LCM, Model: \"a, b\"")
    assert "Negative prompt" not in t2
    assert cimg.parse_a1111_parameters(t2)["model_name"] == "a, b"
    # older A1111 text with the schedule folded into the sampler name
    old = cimg.parse_a1111_parameters("cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")
    assert old["sampler"] == "dpmpp_2m" and old["schedule"] == "karras" and old["guidance"] == 7


def test_a1111_sampler_names_are_cpuflow_samplers():
    from cpuflow.samplers import SAMPLERS

    assert set(cimg.A1111_SAMPLER_NAMES) == set(SAMPLERS)


def test_png_metadata_round_trip(tmp_path):
    p = cimg.save_png_atomic(_gradient(16, 16), tmp_path / "out.png", PARAMS)
    assert cimg.read_png_metadata(p) == PARAMS
    with Image.open(p) as im:
        info = dict(im.info)
        assert im.text["parameters"] == cimg.a1111_parameters(PARAMS)
    assert info["cpuflow:prompt"] == PARAMS["prompt"]
    assert info["cpuflow:seed"] == "42" and info["cpuflow:guidance"] == "7.5"
    assert info["Software"] == "cpuflow 0.1.0"
    raw = p.read_bytes()
    assert b"iTXtcpuflow:prompt" in raw          # CJK / emoji -> UTF-8 iTXt
    assert b"tEXtcpuflow:seed\x0042" in raw      # plain ASCII -> tEXt


def test_png_metadata_odd_values(tmp_path):
    params = {"prompt": "nul\x00byte ünïcödé", "seed": np.int64(7), "loras": ["a", "b"],
              "bad key!": 1, "none": None, "guidance": float("nan")}
    p = cimg.save_png_atomic(Image.new("RGB", (8, 8)), tmp_path / "odd.png", params)
    rec = cimg.read_png_metadata(p)
    assert rec["prompt"] == "nul\x00byte ünïcödé" and rec["seed"] == 7
    assert rec["loras"] == ["a", "b"] and rec["bad key!"] == 1 and rec["none"] is None
    assert rec["guidance"] == "nan" and rec["cpuflow_version"]
    with Image.open(p) as im:
        assert "cpuflow:bad key!" not in im.info and "cpuflow:none" not in im.info
        assert im.info["cpuflow:loras"] == '["a", "b"]'


def test_read_png_metadata_fallbacks(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 9, Size: 640x448")
    p = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(p, pnginfo=info)
    rec = cimg.read_png_metadata(p)
    assert rec == {"prompt": "a cat", "steps": 25, "sampler": "dpmpp_2m", "guidance": 6.5,
                   "seed": 9, "width": 640, "height": 448}
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert cimg.read_png_metadata(plain) == {}
    with pytest.raises(ImageInputError):
        cimg.read_png_metadata(tmp_path / "missing.png")


# --- atomic save -----------------------------------------------------------------------------
def test_save_png_atomic_writes_and_replaces(tmp_path):
    p = tmp_path / "img.png"
    assert cimg.save_png_atomic(_gradient(16, 16), p) == p
    with Image.open(p) as im:
        assert im.size == (16, 16)
    cimg.save_png_atomic(_gradient(24, 8), str(p), {"seed": 1})
    with Image.open(p) as im:
        assert im.size == (24, 8)
    assert sorted(os.listdir(tmp_path)) == ["img.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


@pytest.mark.parametrize("existing", [False, True])
def test_save_png_atomic_crash_mid_write(tmp_path, monkeypatch, existing):
    p = tmp_path / "img.png"
    if existing:
        p.write_bytes(b"previous complete file")
    img = _gradient(16, 16)

    def crash(fp, *a, **kw):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(img, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cimg.save_png_atomic(img, p, {"seed": 1})
    if existing:
        assert p.read_bytes() == b"previous complete file"
        assert os.listdir(tmp_path) == ["img.png"]
    else:
        assert os.listdir(tmp_path) == []


def test_save_png_atomic_disk_full(tmp_path, monkeypatch):
    import errno

    from cpuflow.errors import DiskSpaceError

    img = _gradient(8, 8)

    def full(fp, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(img, "save", full)
    with pytest.raises(DiskSpaceError):
        cimg.save_png_atomic(img, tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_save_png_atomic_bad_targets(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        cimg.save_png_atomic(_gradient(8, 8), tmp_path / "no" / "such" / "x.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(InvalidArgument, match="directory"):
        cimg.save_png_atomic(_gradient(8, 8), tmp_path / "d.png")


def test_save_png_atomic_replaces_symlink_not_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.png"
    link.symlink_to(target)
    cimg.save_png_atomic(_gradient(8, 8), link)
    assert target.read_text() == "keep me"
    assert not link.is_symlink()
    with Image.open(link) as im:
        assert im.size == (8, 8)
