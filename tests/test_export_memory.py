"""The export's memory mechanisms (issue #15 item 1): no telemetry forks of the export
during OpenVINO conversion / NNCF, the per-stage profile's anonymous-memory column.
Tiny inputs only; the full-size figures are in bench/README.md ("int8 export cost")."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from export.to_openvino import no_openvino_telemetry

ROOT = Path(__file__).resolve().parents[1]


def test_no_openvino_telemetry_sends_nothing_during_a_conversion_and_restores_the_sender():
    pytest.importorskip("openvino_telemetry")
    torch = pytest.importorskip("torch")
    import openvino as ov
    from openvino_telemetry.backend import backend_ga4
    from openvino_telemetry.utils.sender import TelemetrySender

    original = TelemetrySender.send
    sent = []
    real = backend_ga4.GA4Backend.send
    backend_ga4.GA4Backend.send = lambda self, message: sent.append(message)
    try:
        with no_openvino_telemetry():
            assert TelemetrySender.send is not original
            ov.convert_model(torch.nn.Linear(3, 2).eval(), example_input=torch.zeros(1, 3))
            sender = TelemetrySender()
            sender.send(backend_ga4.GA4Backend.__new__(backend_ga4.GA4Backend), {"m": 1})
            sender.executor.shutdown(wait=True)  # anything queued has been handed to the backend now
    finally:
        backend_ga4.GA4Backend.send = real
    assert TelemetrySender.send is original
    assert sent == []  # not even queued: no fork of this process to post them


def _stage_profile():
    spec = importlib.util.spec_from_file_location("stage_profile", ROOT / "bench" / "stage_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_profile_gives_each_stage_its_rss_and_anonymous_peaks(tmp_path):
    sp = _stage_profile()
    series = [(0.0, 1e9, 0.5e9), (1.0, 5e9, 1e9), (2.0, 2e9, 1.5e9), (5.0, 1e9, 0.2e9)]
    rows = sp.stage_rows([("[unet] a", 1.0, 1.0), ("[unet] b", 1.0, 5.0)], series)
    assert [(r["peak_rss_gb"], r["peak_anon_gb"]) for r in rows] == [(5.0, 1.5), (1.0, 0.2)]
    # a series written before the anon column still reads (RSS only)
    log, rss = tmp_path / "x.log", tmp_path / "x.rss"
    log.write_text("     2.0 [unet] a ... 1.0 s\n")
    rss.write_text("1.0 4.000\n2.0 3.000\n")
    assert sp.from_files(str(log), str(rss)) == [
        {"stage": "[unet] a", "seconds": 1.0, "ended_at_s": 2.0, "peak_rss_gb": 4.0}]
    total, anon = sp.tree_memory(os.getpid())
    assert total > 0 and 0 < anon <= total


def test_onnx_validation_runs_without_the_arena_give_the_default_sessions_outputs(tiny_export):
    """export/quantize.py runs the ONNX files it checks without ORT's CPU memory arena
    (memory): the outputs are those of a default session, bit for bit."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from export import quantize as quant

    path = tiny_export("sd1").model / "unet" / "model.onnx"
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([999.0, 10.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 128), dtype=np.float32)}
    got = quant._run_many_here("onnx", path, [feeds, feeds])
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["out_sample"], feeds)[0]
    assert np.array_equal(got[0]["out_sample"], want) and np.array_equal(got[1]["out_sample"], want)
