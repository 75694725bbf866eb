"""What an int8 export costs (issue #15 item 1): calibration at a lower resolution,
a few UNet inputs chosen over the noise levels, prompts that stop early, NNCF in a
child process, progress with the time left, and the manifest's record of the options.

Tiny random sd1 model (the session's tiny_export): these prove plumbing, not quality.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("nncf")

from click.testing import CliRunner  # noqa: E402

from cpuflow.errors import InvalidArgument  # noqa: E402
from cpuflow.manifest import MANIFEST_NAME  # noqa: E402
from export import calibrate as cal  # noqa: E402
from export import ort_calibration  # noqa: E402
from export import quantize as quant  # noqa: E402
from export.cli import export_command  # noqa: E402
from export.eta import Eta  # noqa: E402

LEFT = re.compile(r"\d+/\d+ .*elapsed, about \S+ ?s? left")


# --- choosing the samples -------------------------------------------------------------------
def test_selection_spans_the_noise_levels_and_cycles_the_prompts():
    picks = cal.select_calls(4, 10, 8)
    assert len(picks) == 8 and len(set(picks)) == 8
    calls = sorted(c for _, c in picks)
    assert calls[0] == 0 and calls[-1] == 9            # the noisiest and the last call
    assert max(b - a for a, b in zip(calls, calls[1:])) <= 2   # no gap in the noise levels
    assert {p for p, _ in picks} == {0, 1, 2, 3}       # every prompt
    assert cal.select_calls(2, 3, None) == [(p, c) for p in range(2) for c in range(3)]
    assert cal.select_calls(2, 3, 50) == cal.select_calls(2, 3, None)
    # more samples than calls: several prompts at one noise level, never a pick twice
    picks = cal.select_calls(3, 2, 5)
    assert len(picks) == 5 and len(set(picks)) == 5


def test_calibration_resolution_choices():
    assert cal.resolution_for(512, "auto") == 256      # SD 1.5
    assert cal.resolution_for(768, "auto") == 384      # SD 2.x-768
    assert cal.resolution_for(1024, None) == 512       # SDXL
    assert cal.resolution_for(64, "auto") == 64        # small models: their own size
    assert cal.resolution_for(512, "model") == 512
    assert cal.resolution_for(512, 384) == 384
    assert cal.parse_resolution("320px") == 320 and cal.parse_resolution(" Model ") == "model"
    assert cal.parse_samples("all") is None and cal.parse_samples("12") == 12
    with pytest.raises(InvalidArgument, match="multiple of 8"):
        cal.resolution_for(512, 300)
    for bad in ("big", "16", "5000"):
        with pytest.raises(InvalidArgument, match="calibration resolution"):
            cal.parse_resolution(bad)
    for bad in ("0", "many"):
        with pytest.raises(InvalidArgument, match="calibration samples"):
            cal.parse_samples(bad)


@pytest.mark.parametrize("args, message", [
    (["--calibration-samples", "0"], "at least 1"),
    (["--calibration-samples", "lots"], "a count or all"),
    (["--calibration-resolution", "huge"], "auto, model or a size"),
    (["--calibration-resolution", "16"], "between 32 and 4096"),
])
def test_bad_calibration_options_fail_before_any_work(tmp_path, args, message):
    res = CliRunner().invoke(export_command, ["src", str(tmp_path / "o"), "--quantize", "int8", *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_eta_reports_the_time_left():
    lines = []
    with Eta("[unet] work", 3, unit="input", emit=lines.append) as eta:
        for _ in range(3):
            eta.update()
    assert len(lines) == 3 and all(LEFT.search(ln) for ln in lines), lines
    assert lines[-1].startswith("[unet] work: 3/3 inputs") and "about 0 s left" in lines[-1]


# --- the capture ------------------------------------------------------------------------------
def test_capture_at_a_lower_resolution_keeps_few_inputs_and_stops_early(tiny_export):
    """Calibration prompts run at 32x32 (the tiny model's size is 64), the held-out
    run at 64x64; 3 inputs are kept out of 2 prompts' trajectories, and the second
    prompt stops after its last chosen call."""
    model = tiny_export("sd1").model
    lines = []
    got = cal.capture(model, ["a red cube", "a blue ball"], steps=6, backend="openvino", samples=3,
                      resolution=32, precision="f32", progress=lines.append)
    info = got.info
    assert (info["width"], info["height"]) == (32, 32) and info["resolution"] == "reduced"
    assert (info["held_out_width"], info["held_out_height"]) == (64, 64)
    assert len(got.samples) == info["samples"] == 3
    assert all(s["sample"].shape == (2, 4, 4, 4) for s in got.samples)
    assert all(s["sample"].shape == (2, 4, 8, 8) for s in got.held_out)
    calls = info["captured_calls_per_prompt"]
    assert calls >= 6
    assert info["unet_calls"] < 2 * calls     # the second prompt stopped early
    assert len(got.held_out) == info["held_out_calls"] == calls   # the held-out run: every call kept
    # the kept inputs span the noise levels: first and late timesteps both present
    t = sorted(float(s["timestep"].ravel()[0]) for s in got.samples)
    assert t[-1] > 500 and t[0] < 500
    assert len(lines) == 2 and all(LEFT.search(ln) for ln in lines), lines


@pytest.mark.parametrize("backend,fmt", [("openvino", "openvino"), ("onnxruntime", "onnx")])
def test_the_held_out_run_is_its_own_fp32_reference(tiny_export, backend, fmt):
    """The held-out run runs in f32 and keeps the UNet's outputs (issue #15 item 1: no second
    f32 run of the same feeds later): they are what the fp32 file computes on those feeds,
    as the quantizer's own run of the file (quant.run_many) computes it."""
    model = tiny_export("sd1").model
    got = cal.capture(model, ["a red cube"], steps=3, backend=backend, samples=2, resolution=32)
    assert got.info["held_out_precision"] == "f32"
    assert got.held_out_outputs is not None and len(got.held_out_outputs) == len(got.held_out) >= 3
    # lean sessions, but the guidance pair stays one batch-2 call, as a generation runs it
    assert all(f["sample"].shape[0] == 2 for f in got.held_out + got.samples)
    manifest = json.loads((model / MANIFEST_NAME).read_text())
    rel = manifest["components"]["unet"]["variants"]["fp32"]["files"][fmt][0]
    ref = quant.run_many(fmt, model / rel, got.held_out)
    for r, o in zip(ref, got.held_out_outputs):
        assert o.shape == r["out_sample"].shape == got.held_out[0]["sample"].shape
        np.testing.assert_allclose(o, r["out_sample"], rtol=1e-4, atol=1e-5)


# --- NNCF in a child process -----------------------------------------------------------------
def test_nncf_in_a_child_process_writes_the_same_model(tiny_export, tmp_path, monkeypatch):
    """A big UNet is quantized by NNCF in a spawned process (its GBs go back to the
    system when it ends): the same int8 IR as in-process, byte for byte."""
    model = tiny_export("sd1").model
    samples = cal.capture(model, ["a red cube"], steps=3, backend="openvino", samples=3,
                          precision="f32").samples
    src = model / "unet" / "openvino_model.xml"
    here = quant.in_child_if_big(src, quant.ov_quantize, src, tmp_path / "here" / "m.xml", "static", samples)
    spawned = []
    real = ort_calibration.in_child

    def spy(fn, *args):
        spawned.append(fn.__name__)
        return real(fn, *args)

    monkeypatch.setattr(ort_calibration, "in_child", spy)
    monkeypatch.setattr(quant, "CHILD_RUN_BYTES", 0)
    child = quant.in_child_if_big(src, quant.ov_quantize, src, tmp_path / "child" / "m.xml", "static", samples)
    assert spawned == ["ov_quantize"]
    assert here == child
    assert here["ops"]["FakeQuantize"] > 0
    assert (tmp_path / "here" / "m.bin").read_bytes() == (tmp_path / "child" / "m.bin").read_bytes()
    # the graphs are equal up to the numbers OpenVINO gives new nodes (a per-process counter)
    anon = re.compile(r'name="([A-Za-z]+)_\d+"')
    xml = [anon.sub(r'name="\1_N"', (tmp_path / d / "m.xml").read_text()) for d in ("here", "child")]
    assert xml[0] == xml[1]


def test_nncf_writes_the_same_int8_file_with_its_weight_statistics_folded_in_numpy(tiny_export, tmp_path,
                                                                                     monkeypatch):
    """export/constant_reduces.py: the weight ranges NNCF's statistics model reduces are folded
    in numpy before OpenVINO compiles it; the int8 IR is byte-identical to NNCF's own."""
    import contextlib

    from export import constant_reduces
    model = tiny_export("sd1").model
    samples = cal.capture(model, ["a red cube"], steps=2, backend="openvino", samples=2,
                          precision="f32").samples
    src = model / "unet" / "openvino_model.xml"
    counts = []
    real = constant_reduces.fold_constant_reduces
    monkeypatch.setattr(constant_reduces, "fold_constant_reduces", lambda m: counts.append(real(m)) or counts[-1])
    quant.ov_quantize(src, tmp_path / "folded" / "m.xml", "static", samples)
    assert max(counts) > 0      # the statistics model had weight reduces, and they were folded
    monkeypatch.setattr(quant, "weight_statistics_in_numpy", lambda: contextlib.nullcontext([]))
    quant.ov_quantize(src, tmp_path / "openvino" / "m.xml", "static", samples)
    assert ((tmp_path / "folded" / "m.bin").read_bytes() == (tmp_path / "openvino" / "m.bin").read_bytes())


# --- the whole export: options recorded, progress shown ----------------------------------------
def test_export_records_the_calibration_used_shows_progress_and_runs_fp32_once(tiny_export, tmp_path,
                                                                                monkeypatch):
    """One both-format int8 export (one export for the two checks, to keep the suite short):
    the calibration asked for and used is recorded, the capture shows its progress with the
    time left, and the quantizers' checks run the int8 files only on the held-out feeds (the
    fp32 reference came from the held-out run itself; both formats are measured against it)."""
    ran = []
    real = quant.run_many

    def recording(fmt, path, feeds_list):
        ran.append((fmt, Path(path).name, len(feeds_list)))
        return real(fmt, path, feeds_list)

    monkeypatch.setattr(quant, "run_many", recording)
    src = tiny_export("sd1").src
    out = tmp_path / "m"
    res = CliRunner().invoke(export_command, [str(src), str(out), "--quantize", "int8",
                                              "--calibration-size", "2", "--calibration-steps", "4",
                                              "--calibration-samples", "3", "--calibration-resolution", "32"])
    assert res.exit_code == 0, res.output
    assert LEFT.search(res.output), res.output     # the capture's progress, with the time left
    m = json.loads((out / MANIFEST_NAME).read_text())
    rec = m["export"]["quantize"]["calibration"]
    assert rec["asked"] == {"prompts": 2, "steps": 4, "samples": 3, "resolution": 32}
    assert rec["samples"] == 3 and (rec["width"], rec["held_out_width"]) == (32, 64)
    assert rec["held_out_precision"] == "f32"
    q = m["components"]["unet"]["variants"]["int8"]["quantization"]["openvino"]["calibration"]
    assert (q["samples"], q["width"], q["height"], q["held_out_width"]) == (3, 32, 32, 64)
    assert "noise levels" in q["selection"]
    unet_runs = [r for r in ran if r[2] > 1]      # the check's feed plus the held-out feeds
    assert sorted(name for _, name, _ in unet_runs) == ["model_int8.onnx", "openvino_model_int8.xml"]
    for fmt in ("onnx", "openvino"):
        held = m["components"]["unet"]["variants"]["int8"]["parity"][fmt]["held_out"]
        assert held["reference_format"] == "openvino" and np.isfinite(held["psnr_db"])
