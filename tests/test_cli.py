"""The command line as a user meets it: outputs, metadata, errors, interrupts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow.cli import main
from cpuflow.image import read_png_metadata


@pytest.fixture(scope="module")
def model(tiny_export):
    return tiny_export("sd1").model


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def test_generate_one_file_with_metadata(model, tmp_path):
    out = tmp_path / "cat.png"
    r = run("generate", "--model", model, "a red circle", "--steps", 3, "--seed", 5, "--out", out,
            "--backend", "onnxruntime", "-q")
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.size == (64, 64)
    meta = read_png_metadata(out)
    assert meta["seed"] == 5 and meta["steps"] == 3 and meta["prompt"] == "a red circle"
    assert meta["backend"] == "onnxruntime" and meta["model_hash"]
    assert "Steps: 3" in img.text["parameters"] and "Seed: 5" in img.text["parameters"]


def test_generate_many_with_grid_never_overwrites(model, tmp_path):
    args = ("generate", "--model", model, "a red circle", "--steps", 2, "--seed", 9, "--n-samples", 3,
            "--grid", "--out", tmp_path, "-q")
    r = run(*args)
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["image-00000-grid.png", "image-00000.png", "image-00001.png", "image-00002.png"]
    assert [read_png_metadata(tmp_path / f"image-0000{i}.png")["seed"] for i in range(3)] == [9, 10, 11]
    assert Image.open(tmp_path / "image-00000-grid.png").size == (192, 64)
    assert run(*args).exit_code == 0
    assert len(list(tmp_path.glob("*.png"))) == 8        # the second run wrote beside, not over


def test_random_seed_is_printed_and_recorded(model, tmp_path):
    out = tmp_path / "r.png"
    r = run("generate", "--model", model, "x", "--steps", 1, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    seed = read_png_metadata(out)["seed"]
    assert f"seed {seed}" in r.output


@pytest.mark.parametrize("args, msg", [
    (["--width", "500"], "width must be a multiple of 8, got 500"),
    (["--steps", "0"], "steps must be between 1 and 1000"),
    (["--guidance", "nan"], "guidance must be finite"),
    (["--seed", "-3"], "seed must be between 0 and 4294967295"),
    (["--sampler", "magic"], "sampler must be one of ddim, plms, euler, euler_a, heun, dpmpp_2m, lcm"),
    (["--init-image", "missing.png"], "missing.png"),
    (["--init-image", "__SELF__", "--strength", "0.01", "--steps", "20"], "no denoising step"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(model, tmp_path, args, msg):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "red").save(init)
    args = [str(init) if a == "__SELF__" else a for a in args]
    out = tmp_path / "o.png"
    r = run("generate", "--model", model, "a cat", "--out", out, "-q", *args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_missing_or_damaged_model_exit_3(model, tmp_path):
    r = run("generate", "--model", tmp_path / "nope", "a cat", "-q")
    assert r.exit_code == 3 and "does not exist" in r.output
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    f = broken / "unet" / "model.onnx_data"
    f.write_bytes(f.read_bytes()[:-10])
    r = run("generate", "--model", broken, "a cat", "-q", "--out", tmp_path / "b.png")
    assert r.exit_code == 3 and "unet/model.onnx_data" in r.output and "re-export" in r.output
    assert not (tmp_path / "b.png").exists()


def test_long_prompts_run_and_an_old_export_cuts_them_with_a_warning(model, tmp_path):
    """A current export takes prompts of several 75-token chunks (parity: tests/test_prompts.py);
    the shipped model is a schema-1 export (UNet of 77 tokens): its first chunk is used, with a warning."""
    long = "a red circle " + " ".join(["a red car in the city at night"] * 25)   # 3 chunks here, 7 shipped
    r = run("generate", "--model", model, long, "--steps", 1, "--out", tmp_path / "l.png", "-q")
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    r = run("generate", long, "--steps", 1, "--out", tmp_path / "s.png", "-q")
    assert r.exit_code == 0, r.output
    assert "warning: the prompt needs 7 chunks" in r.output and "re-export" in r.output


def test_any_multiple_of_8_works(model, tmp_path):
    """The UNet is exported with size-forwarding upsampling: 72 px (9 latents) is fine."""
    r = run("generate", "--model", model, "x", "--steps", 1, "--width", 72, "--out", tmp_path / "w.png", "-q")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "w.png").size == (72, 64)


def test_img2img_from_cli(model, tmp_path):
    init = tmp_path / "init.jpg"
    Image.new("RGB", (100, 70), "blue").save(init)
    out = tmp_path / "i2i.png"
    r = run("generate", "--model", model, "a cat", "--init-image", init, "--strength", "0.5", "--steps", 4,
            "--out", out, "-q")
    assert r.exit_code == 0, r.output
    # the photo's aspect ratio (100:70) at the model's 64x64 area, sides the nearest multiples of 8
    assert Image.open(out).size == (80, 56)
    meta = read_png_metadata(out)
    assert meta["task"] == "img2img" and meta["strength"] == 0.5


def test_info_human_and_json(model):
    r = run("info", model)
    assert r.exit_code == 0, r.output
    assert "family       sd1" in r.output and "unet" in r.output and "psnr" in r.output
    r = run("info", model, "--json")
    assert json.loads(r.output)["schema_version"] == 2


def test_samplers_listed():
    r = run("samplers")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.output.strip().splitlines()] == \
        ["ddim", "plms", "euler", "euler_a", "heun", "dpmpp_2m", "lcm"]


def test_ctrl_c_stops_within_a_step_and_writes_nothing(model, tmp_path):
    """SIGINT during sampling: exit 130, no image, no temp file. stderr is a
    pseudo-terminal so the progress bar shows when sampling has started.

    The child gets the default SIGINT disposition whatever the caller's is: a
    suite started as a background job (or by some CI runners) ignores SIGINT, and
    an ignored signal stays ignored across exec. The test makes that case itself
    (it ignores SIGINT while starting the child), so it proves the reset every run."""
    import pty
    out = tmp_path / "never.png"
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    caller = signal.signal(signal.SIGINT, signal.SIG_IGN)   # as a background job's shell has it
    try:
        p = subprocess.Popen([sys.executable, "-m", "cpuflow.cli", "generate", "--model", str(model), "a cat",
                              "--steps", "500", "--out", str(out), "--backend", "onnxruntime"],
                             stderr=slave, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finally:
        signal.signal(signal.SIGINT, caller)
    os.close(slave)
    buf = b""
    deadline = time.time() + 120
    while b"step/s" not in buf and time.time() < deadline and p.poll() is None:
        try:
            buf += os.read(master, 4096)
        except OSError:
            break
    assert b"step/s" in buf, buf.decode(errors="replace")
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    rest = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        rest += chunk
    p.wait(timeout=60)
    os.close(master)
    assert time.time() - t0 < 30       # within about a step (tiny model), with room for a busy machine
    assert p.returncode == 130, (buf + rest).decode(errors="replace")
    assert b"interrupted" in rest
    assert list(tmp_path.iterdir()) == []
