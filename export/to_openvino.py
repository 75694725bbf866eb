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
from pathlib import Path

from cpuflow.errors import ExportError

XML_FILE = "openvino_model.xml"
BIN_FILE = "openvino_model.bin"


def convert_onnx_to_openvino(onnx_path: Path, out_dir: Path, *, weights: str = "fp32") -> list[Path]:
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / XML_FILE
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml), compress_to_fp16=(weights == "fp16"))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises plain RuntimeErrors
        raise ExportError(f"OpenVINO conversion of {onnx_path.parent.name} failed: {e}") from e
    finally:
        model = None
        gc.collect()
    return [xml, out_dir / BIN_FILE]
