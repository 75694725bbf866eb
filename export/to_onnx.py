"""torch module -> ``<component>/model.onnx`` + ``model.onnx_data``.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``).
Measured here on a tiny SD UNet (torch 2.13, 2 cores): 4.6 s against 36 s for the
dynamo exporter, whose torch.export + decompositions + onnxscript optimizer passes
grow with the graph (reported at several minutes and many GB for the 860M-param
SD UNet), while the TorchScript exporter does the full UNet in about 30 s. It
also takes ``dynamic_axes`` natively, where torch.export turns diffusers' Python
shape checks (``dim % upsample_factor``) into guards and specialisations. It is
deprecated upstream but present in 2.13; if it is gone or fails we fall back to
the dynamo exporter (the parity gate checks whichever ran).

Both exporters write huge models (> 2 GB protobuf limit) as external data, the
TorchScript one as one file per tensor. We always export into a scratch folder
and then rewrite the model streaming, tensor by tensor, into exactly ONE external
data file ``model.onnx_data`` next to ``model.onnx`` (relative location), so the
layout is the same for tiny and full-size models and no step holds two copies of
the weights in memory.

``weights="fp16"``: large float32 initializers are stored as float16 and a Cast
to float32 is inserted in front of their users. The graph interface and all
compute stay float32 (onnxruntime folds the casts at load; OpenVINO keeps
compressed constants and decompresses to its inference precision) — a CPU user
never gets fp16 arithmetic, only half the file size.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cpuflow.errors import ExportError

OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
# Tensors below this many bytes stay inside model.onnx (scalars, shape constants).
EXTERNAL_THRESHOLD = 1024


def export_onnx(module, spec, example_inputs: tuple, out_dir: Path, *, weights: str = "fp32",
                exporter: str = "torchscript") -> tuple[list[Path], str]:
    """Export ``module`` (a wrapper from components.py) into ``out_dir``.

    Returns (files written, exporter used). Raises ExportError on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".onnx-export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    raw = scratch / MODEL_FILE
    used = exporter
    try:
        try:
            _torch_export(module, spec, example_inputs, raw, dynamo=(exporter == "dynamo"))
        except Exception as first:  # noqa: BLE001 - fall back, then report both
            if exporter != "torchscript":
                raise ExportError(f"{spec.name}: ONNX export failed ({type(first).__name__}: {first})") from first
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            used = "dynamo"
            try:
                _torch_export(module, spec, example_inputs, raw, dynamo=True)
            except Exception as second:  # noqa: BLE001
                raise ExportError(
                    f"{spec.name}: ONNX export failed with both exporters "
                    f"(torchscript: {type(first).__name__}: {first}; dynamo: {type(second).__name__}: {second})"
                ) from second
        files = consolidate(raw, out_dir / MODEL_FILE, fp16=(weights == "fp16"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files, used


def _torch_export(module, spec, example_inputs, path: Path, *, dynamo: bool) -> None:
    import torch

    kwargs = dict(input_names=spec.input_names(), output_names=spec.output_names(),
                  dynamic_axes=spec.dynamic_axes, opset_version=OPSET if not dynamo else max(OPSET, 18),
                  do_constant_folding=True)
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about diffusers' Python-side shape checks are expected:
        # the trace shapes are chosen so those checks take the general branch.
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, example_inputs, str(path), dynamo=True, external_data=True,
                              optimize=True, **kwargs)
        else:
            torch.onnx.export(module, example_inputs, str(path), dynamo=False, **kwargs)


# --- one external data file ----------------------------------------------------
def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_tensors(g)


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _read_tensor_bytes(t: TensorProto, base: Path) -> bytes:
    """The raw little-endian bytes of ``t``, from its external file or inline."""
    if t.data_location == TensorProto.EXTERNAL:
        info = _external_info(t)
        loc = info["location"]
        if os.path.isabs(loc) or ".." in Path(loc).parts:
            raise ExportError(f"exporter wrote external data outside its folder: {loc!r}")
        offset = int(info.get("offset", 0))
        length = info.get("length")
        with open(base / loc, "rb") as f:
            f.seek(offset)
            return f.read(int(length)) if length is not None else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)  # typed fields (float_data, int32_data, ...)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def consolidate(src: Path, dst: Path, *, fp16: bool = False) -> list[Path]:
    """Rewrite the ONNX model at ``src`` (weights inline or in any number of
    external files beside it) as ``dst`` + ``dst.parent/model.onnx_data``.

    Streams one tensor at a time; with ``fp16``, float32 initializers of at least
    EXTERNAL_THRESHOLD bytes are stored as float16 behind a Cast to float32.
    Returns the written files, model file first."""
    model = onnx.load(str(src), load_external_data=False)
    base = src.parent
    data_path = dst.parent / DATA_FILE
    casts: list[onnx.NodeProto] = []
    # 4096-byte alignment lets onnxruntime / OpenVINO memory-map each tensor.
    align = 4096
    with open(data_path, "wb") as data:
        converted = set()
        if fp16:
            converted = _fp16_initializers(model, base, data, casts)
        for t in _graph_tensors(model.graph):
            if t.name in converted:
                continue
            is_ext = t.data_location == TensorProto.EXTERNAL
            if not is_ext and (t.data_type == TensorProto.STRING or t.ByteSize() < EXTERNAL_THRESHOLD):
                continue
            buf = _read_tensor_bytes(t, base)
            if not is_ext:
                _clear_inline(t)  # the bytes move out: external data is raw little-endian
            offset = _append(data, buf, align)
            _set_external(t, DATA_FILE, offset, len(buf))
            del buf
        size = data.tell()
    if casts:
        # Casts go first: topological order is required by the ONNX spec.
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(casts + nodes)
    files = [dst]
    onnx.save_model(model, str(dst))
    if size == 0:
        data_path.unlink()
    else:
        files.append(data_path)
    try:
        onnx.checker.check_model(str(dst))  # path form: resolves external data, no 2 GB limit
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"exported {dst} fails the ONNX checker: {e}") from e
    return files


def _clear_inline(t: TensorProto) -> None:
    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                "uint64_data", "string_data"):
        t.ClearField(fld)


def _append(f, buf: bytes, align: int) -> int:
    pos = f.tell()
    pad = (-pos) % align
    if pad:
        f.write(b"\0" * pad)
        pos += pad
    f.write(buf)
    return pos


def _fp16_initializers(model: onnx.ModelProto, base: Path, data, casts: list) -> set[str]:
    """Store big float32 initializers as float16 (external), each behind a Cast
    back to float32 that keeps the original name, so every consumer and the
    graph interface stay float32."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    converted = set()
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT or t.name in inputs:
            continue
        n = 1
        for d in t.dims:
            n *= d
        if n * 4 < EXTERNAL_THRESHOLD:
            continue
        arr = np.frombuffer(_read_tensor_bytes(t, base), dtype="<f4")
        if arr.size and float(np.abs(arr).max()) > 65504.0:
            continue  # would overflow fp16: keep fp32
        half = arr.astype("<f2").tobytes()
        del arr
        name = t.name
        t.name = name + "__fp16"
        t.data_type = TensorProto.FLOAT16
        _clear_inline(t)
        off = _append(data, half, 4096)
        _set_external(t, DATA_FILE, off, len(half))
        casts.append(helper.make_node("Cast", [t.name], [name], to=TensorProto.FLOAT,
                                      name=name + "__to_fp32"))
        converted.add(t.name)
    return converted
