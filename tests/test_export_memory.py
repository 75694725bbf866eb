"""The export's memory mechanisms (issue #15 item 1): paging out mapped weight files while
OpenVINO / NNCF hold their own packed copy, no telemetry forks of the export during OpenVINO
conversion / NNCF, the per-stage profile's anonymous-memory column.
Tiny inputs only; the full-size figures are in bench/README.md ("int8 export cost")."""
from __future__ import annotations

import importlib.util
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from cpuflow import mapped_pages
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


def _mapping_rss_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    want, total, inside = str(path.resolve()), 0, False
    for line in open("/proc/self/smaps", encoding="utf-8", errors="replace"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not line.startswith(("Rss", "Size")):
            inside = len(head) == 6 and head[5] == want
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / /proc are Linux's")
def test_page_out_drops_the_mapped_pages_and_keeps_the_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    f = tmp_path / "w.bin"
    data.tofile(f)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page resident
        before = _mapping_rss_kb(f)
        assert before >= 7 * 1024
        advised = mapped_pages.page_out([f])
        if advised == 0:
            pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
        assert advised >= len(data)
        assert _mapping_rss_kb(f) < before // 2
        assert np.array_equal(view, data)  # faulted back in from the file, unchanged
        del view


def test_dropping_mapped_pages_is_a_no_op_without_mappings_or_off_linux(tmp_path, monkeypatch):
    assert mapped_pages.page_out([tmp_path / "absent.bin"]) == 0
    with mapped_pages.dropping_mapped_pages([tmp_path / "absent.bin"], interval=0.01):
        pass
    monkeypatch.setattr(mapped_pages.sys, "platform", "win32")
    assert mapped_pages.page_out([tmp_path / "absent.bin"]) == 0
    with mapped_pages.dropping_mapped_pages([tmp_path / "absent.bin"]):
        pass


def test_openvino_runs_give_the_same_outputs_with_pages_paged_out(tiny_export, monkeypatch):
    """The validation runner (export/quantize.py) pages the UNet's weights file out
    while OpenVINO compiles and runs it: outputs equal a plain compile's, bit for bit."""
    pytest.importorskip("openvino")
    import openvino as ov

    from export import quantize as quant

    model = tiny_export("sd1").model
    xml = model / "unet" / "openvino_model.xml"
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([999.0, 10.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 128), dtype=np.float32)}
    calls = []
    real = mapped_pages.page_out
    monkeypatch.setattr(mapped_pages, "page_out", lambda paths: calls.append(list(paths)) or real(paths))
    got = quant._run_many_here("openvino", xml, [feeds, feeds])
    assert calls and all(p == [xml.with_suffix(".bin")] for p in calls)
    req = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    want = np.array(req.infer(feeds)["out_sample"])
    assert np.array_equal(got[0]["out_sample"], want) and np.array_equal(got[1]["out_sample"], want)
