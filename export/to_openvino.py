"""ONNX file -> ``<component>/openvino_model.xml`` + ``openvino_model.bin``.

We convert from the ONNX file rather than from torch: the torch module can be
freed before this step (its reference outputs are already computed), OpenVINO's
ONNX frontend memory-maps the external data, and both formats then come from
the same graph, so they cannot disagree about names or dynamic dimensions.

``openvino.save_model`` compresses weights to fp16 BY DEFAULT; we pass
``compress_to_fp16`` explicitly: False for ``--weights fp32``, True for fp16.
Compressed weights are decompressed to the inference precision on CPU (f32 with
the f32 hint), so the user never gets fp16 compute from this either.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cpuflow.errors import ExportError

XML_FILE = "openvino_model.xml"
BIN_FILE = "openvino_model.bin"


@contextmanager
def no_openvino_telemetry() -> Iterator[None]:
    """OpenVINO's converter and NNCF without their usage telemetry, for this block.

    ``import openvino``, each ``openvino.convert_model`` and each NNCF call send
    events through ``openvino_telemetry``, whose sender on Linux starts a
    ``multiprocessing.Process`` (a fork) per event and waits for it up to a
    timeout. A fork of the export is a copy-on-write twin of everything it holds:
    while the SD 1.5 weights were loaded (4.8 GB) each such fork doubled the
    export's process tree for ~3 s (10.1 GB peak during the UNet's conversion,
    bench/README.md "int8 export cost", 2026-12-04), and every page the export
    writes meanwhile is copied for real. Here the sender drops the events
    (``TelemetrySender.send`` does nothing) until the block ends; nothing else
    changes, and the user's opt-in file is neither read nor written."""
    try:
        from openvino_telemetry.utils.sender import TelemetrySender
    except ImportError:  # not installed: OpenVINO uses its own stub, nothing is sent
        yield
        return
    send = TelemetrySender.__dict__.get("send")
    TelemetrySender.send = lambda self, backend, message: None
    try:
        yield
    finally:
        if send is not None:
            TelemetrySender.send = send


def convert_onnx_to_openvino(onnx_path: Path, out_dir: Path, *, weights: str = "fp32") -> list[Path]:
    with no_openvino_telemetry():  # the first `import openvino` sends an event too
        import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / XML_FILE
    try:
        with no_openvino_telemetry():
            model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml), compress_to_fp16=(weights == "fp16"))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises plain RuntimeErrors
        raise ExportError(f"OpenVINO conversion of {onnx_path.parent.name} failed: {e}") from e
    finally:
        model = None
        gc.collect()
    return [xml, out_dir / BIN_FILE]
