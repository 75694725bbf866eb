"""torch wrapper module -> ``<component>/openvino_model.xml`` + ``openvino_model.bin``, no ONNX.

Used when an export writes OpenVINO files only (``cpuflow export ... --format
openvino``). The ONNX path (export/to_onnx.py, then export/to_openvino.py) holds
the torch module AND the exporter's serialized copy of every weight: for the
SDXL base UNet (2.57 B parameters, 10.3 GB in float32) that does not fit a
24 GB machine. ``openvino.convert_model(module, example_input=...)`` traces the
module with TorchScript and builds the OpenVINO graph with its constants
sharing the torch tensors' memory, so the peak is about one copy of the weights
plus the trace (measured 17.4 GiB for the SDXL UNet, bench/sdxl_unet_latency.py).

The result is the same contract as the ONNX path's IR, which the runtime
depends on:

* input names and order = ``spec.input_names()``, output names =
  ``spec.output_names()`` (set explicitly on the graph's tensors: the torch
  frontend would otherwise name outputs by node index);
* every dimension named in ``spec.dynamic_axes`` is dynamic (``-1``), every
  other one static, element types from the spec (int64 input_ids, float32
  elsewhere); the output shapes follow by shape inference, as for the ONNX IR;
* ``weights="fp16"``: ``compress_to_fp16=True`` at save (storage only: the CPU
  decompresses to its inference precision), ``fp32``: ``False`` (OpenVINO's
  default would compress).

The caller computes the torch reference first, releases the torch module after
this returns, and then runs the same parity gate (export/validate.py) on the
saved files as for the ONNX path.
"""
from __future__ import annotations

import gc
import warnings
from pathlib import Path

from cpuflow.errors import ExportError

from .to_openvino import BIN_FILE, XML_FILE, no_openvino_telemetry

CONVERTER = "openvino.convert_model(torch)"   # recorded as the manifest's export.ir_converter
ONNX_CONVERTER = "openvino.convert_model(onnx)"


def _partial_shape(spec, tensor_spec):
    import openvino as ov

    axes = spec.dynamic_axes.get(tensor_spec.name, {})
    dims = [-1 if (i in axes or isinstance(d, str)) else int(d) for i, d in enumerate(tensor_spec.shape)]
    return ov.PartialShape(dims)


def _element_type(dtype: str):
    import openvino as ov

    types = {"float32": ov.Type.f32, "int64": ov.Type.i64, "int32": ov.Type.i32, "float16": ov.Type.f16}
    if dtype not in types:
        raise ExportError(f"no OpenVINO element type for the contract's dtype {dtype!r}")
    return types[dtype]


def convert_torch_to_openvino(module, spec, example_inputs: tuple, out_dir: Path, *,
                              weights: str = "fp32") -> list[Path]:
    """Convert ``module`` (a wrapper from export/components*.py or export/taesd.py)
    straight to OpenVINO IR in ``out_dir``. Returns [xml, bin]. Raises ExportError."""
    with no_openvino_telemetry():  # the first `import openvino` sends an event too
        import openvino as ov
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / XML_FILE
    model = None
    try:
        inputs = [(_partial_shape(spec, s), _element_type(s.dtype)) for s in spec.inputs]
        with torch.no_grad(), warnings.catch_warnings(), no_openvino_telemetry():
            # TracerWarnings about diffusers' Python-side shape checks are expected (see to_onnx.py)
            warnings.simplefilter("ignore")
            model = ov.convert_model(module, example_input=tuple(example_inputs), input=inputs)
        _name_ports(model, spec)
        ov.save_model(model, str(xml), compress_to_fp16=(weights == "fp16"))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - OpenVINO raises plain RuntimeErrors / OpConversionFailure
        raise ExportError(f"{spec.name}: direct torch -> OpenVINO conversion failed ({type(e).__name__}: {e})",
                          hint="retry with --format both (the ONNX path) to see whether that converter works") from e
    finally:
        model = None  # its constants share the torch weights' memory: drop it before the caller releases torch
        gc.collect()
    return [xml, out_dir / BIN_FILE]


def _name_ports(model, spec) -> None:
    """Give the graph's inputs and outputs exactly the contract's names."""
    ins, outs = spec.input_names(), spec.output_names()
    if len(model.inputs) != len(ins) or len(model.outputs) != len(outs):
        raise ExportError(f"{spec.name}: the converted graph has {len(model.inputs)} inputs and "
                          f"{len(model.outputs)} outputs, the contract {len(ins)} and {len(outs)}")
    for port, name in zip(model.inputs, ins):
        port.get_tensor().set_names({name})
        port.get_node().set_friendly_name(name)
    for port, name in zip(model.outputs, outs):
        port.get_tensor().set_names({name})
