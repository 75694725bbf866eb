"""`cpuflow upscale` (and `generate --upscale`) as a user meets them: outputs, metadata, one-line errors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow.cli import main
from cpuflow.image import read_png_metadata

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(p)
    return p


def test_upscale_writes_4x_with_metadata(tiny_upscale_export, small, tmp_path):
    out = tmp_path / "big.png"
    r = run("upscale", "--model", tiny_upscale_export.model, small, "a cat", "--steps", 2, "--seed", 4,
            "--noise-level", 30, "--negative-prompt", "dog", "--backend", "onnxruntime", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (96, 64)
    meta = read_png_metadata(out)
    assert meta["task"] == "upscale" and meta["noise_level"] == 30 and meta["seed"] == 4
    assert meta["prompt"] == "a cat" and meta["negative_prompt"] == "dog" and meta["input_width"] == 24
    assert "tiles: one piece" in r.output      # the tile choice is said


@pytest.mark.parametrize("args, message", [
    (("--noise-level", 351), "noise_level must be between 0 and 350"),
    (("--tile", 20), "tile must be a multiple of 8"),
    (("--steps", 0), "steps must be between 1"),
])
def test_bad_options_exit_2_and_write_nothing(tiny_upscale_export, small, tmp_path, args, message):
    out = tmp_path / "o"
    r = run("upscale", "--model", tiny_upscale_export.model, small, *args, "--out", out, "-q")
    assert r.exit_code == 2 and message in r.output, r.output
    assert r.output.count("\n") == 1 and not out.exists()


def test_bad_images_exit_2(tiny_upscale_export, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    big = tmp_path / "big.png"
    Image.new("RGB", (1025, 1024)).save(big)
    for img, message in ((bad, "not an image"), (big, "above the limit of 1048576")):
        r = run("upscale", "--model", tiny_upscale_export.model, img, "--out", tmp_path / "out", "-q")
        assert r.exit_code == 2 and message in r.output, r.output
        assert r.output.startswith("error: ") and r.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_wrong_and_damaged_folders(tiny_upscale_export, tiny_export, small, tmp_path):
    r = run("upscale", "--model", tiny_export("sd2-v").model, small, "--out", tmp_path / "a.png", "-q")
    assert r.exit_code == 2 and "not an x4 upscaler" in r.output, r.output
    r = run("generate", "--model", tiny_upscale_export.model, "a cat", "--out", tmp_path / "b.png", "-q")
    assert r.exit_code == 2 and "is an x4 upscaler" in r.output, r.output
    damaged = tmp_path / "x4"
    shutil.copytree(tiny_upscale_export.model, damaged)
    next(damaged.glob("unet/*.bin")).write_bytes(b"truncated")
    r = run("upscale", "--model", damaged, small, "--out", tmp_path / "c.png", "-q")
    assert r.exit_code == 3 and "re-export" in r.output, r.output
    assert not any((tmp_path / f"{n}.png").exists() for n in "abc")


def test_generate_then_upscale_in_one_command(tiny_upscale_export, tmp_path):
    """The shipped 64x64 model, then the tiny upscaler: a 256x256 image whose record keeps the base one."""
    out = tmp_path / "up.png"
    r = run("generate", "a red circle on a blue background", "--steps", 2, "--seed", 3,
            "--upscale", tiny_upscale_export.model, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (256, 256)
    meta = read_png_metadata(out)
    assert meta["task"] == "upscale" and meta["seed"] == 3 and meta["prompt"] == "a red circle on a blue background"
    assert meta["base"]["task"] == "txt2img" and meta["base"]["width"] == 64
    r = run("generate", "a red circle", "--steps", 1, "--upscale", tmp_path, "--out", tmp_path / "no.png", "-q")
    assert r.exit_code == 3 and not (tmp_path / "no.png").exists(), r.output   # no model there: damaged / missing
