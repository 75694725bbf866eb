"""Lean MinMax calibration for ONNX Runtime's ``quantize_static`` (issue #4).

onnxruntime.quantization's ``MinMaxCalibrater`` loads the whole model WITH its
weights into a protobuf (after a shape-inference pass that writes a copy), saves
an augmented copy of model + weights, and then an InferenceSession loads that
copy again (plus prepacked weight copies and its arena): for the 3.4 GB SD 1.5
UNet the quantized export was killed by the OOM killer on a 24 GB machine.
The ReduceMin / ReduceMax outputs it collects are scalars.

This module computes the same ranges from the GRAPH only:

* ``onnx.load(path, load_external_data=False)`` + shape inference on that
  graph (initializers keep their dims, so shapes infer as before);
* ReduceMin / ReduceMax (keepdims=0: one scalar each) on the float inputs and
  outputs of the nodes quantize_static will quantize (``op_types``, minus
  ``exclude``d node names: the int8 recipe leaves attention's weightless
  MatMuls float, so their (batch x heads x 4096 x 4096) score tensors need no
  range);
* the augmented graph is saved BESIDE the fp32 model, so its external-data
  references resolve to the same weights file (no copy of the weights);
* one InferenceSession, optimizations off (as ORT's calibrator runs it, so the
  values are the same), prepacking off, no CPU arena, few threads;
* min / max merged over the samples with ``np.nanmin`` / ``np.nanmax`` as ORT's
  calibrator does, saved with ORT's own ``save_tensors_data`` as the
  calibration cache that ``quantize_static(calibration_cache_path=...)`` reads.

tests/test_quantize.py checks the ranges equal ``MinMaxCalibrater``'s on the
tiny UNet, and that quantize_static writes the same model from either cache.
"""
from __future__ import annotations

import gc
import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

FLOAT_TYPES = (1, 10)  # TensorProto.FLOAT, FLOAT16: what ORT's calibrator calibrates


def tensors_to_calibrate(model, op_types: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Float, non-initializer inputs / outputs of the ``op_types`` nodes not in
    ``exclude`` (node names), in graph order: ORT's ``select_tensors_to_calibrate``
    restricted to the nodes that will be quantized. ``model`` must carry
    shape-inferred value_info (element types)."""
    ops = set(op_types)
    skip = set(exclude)
    g = model.graph
    infos = {vi.name: vi for vi in g.value_info}
    infos.update({o.name: o for o in g.output})
    infos.update({i.name: i for i in g.input})
    inits = {t.name for t in g.initializer}
    out: dict[str, None] = {}
    for node in g.node:
        if node.op_type not in ops or node.name in skip:
            continue
        for name in list(node.input) + list(node.output):
            vi = infos.get(name)
            if (name and vi is not None and name not in inits and vi.type.HasField("tensor_type")
                    and vi.type.tensor_type.elem_type in FLOAT_TYPES):
                out[name] = None
    return list(out)


def augment(model, tensors: list[str]) -> list[tuple[str, str]]:
    """Add a ReduceMin and a ReduceMax (keepdims=0, all axes) per tensor as graph
    outputs, in place, each right after the node that makes the tensor (graph
    inputs: first), so the graph stays topologically sorted and each activation
    can be freed as early as before; returns the (min, max) output names per tensor."""
    from onnx import TensorProto, helper

    g = model.graph
    want = set(tensors)
    pairs: dict[str, tuple[str, str]] = {}
    reduces: dict[str, list] = {}
    for name in tensors:
        tag = uuid.uuid4().hex[:8]
        lo, hi = f"{name}_calib_min_{tag}", f"{name}_calib_max_{tag}"
        reduces[name] = [helper.make_node("ReduceMin", [name], [lo], keepdims=0, name=lo),
                         helper.make_node("ReduceMax", [name], [hi], keepdims=0, name=hi)]
        pairs[name] = (lo, hi)
    nodes = []
    placed: set[str] = set()
    for name in [i.name for i in g.input if i.name in want]:
        nodes += reduces[name]
        placed.add(name)
    for node in g.node:
        nodes.append(node)
        for name in node.output:
            if name in want and name not in placed:
                nodes += reduces[name]
                placed.add(name)
    for name in tensors:  # made by no node (cannot happen in a valid graph): last
        if name not in placed:
            nodes += reduces[name]
    copies = []
    for n in nodes:  # copy before clearing: the repeated field owns the originals
        c = type(n)()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)
    for name in tensors:
        for out in pairs[name]:
            g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
    return [pairs[t] for t in tensors]


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # as onnxruntime.quantization's calibrator runs it: the ranges of the graph as written
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # run each ReduceMin / ReduceMax as soon as its tensor exists (Kahn order, lowest
    # node index first; augment() puts them right after the producer): the default
    # depth-first order from the graph outputs runs them after everything else,
    # holding every calibrated activation at once (+3 GB on the SD 1.5 UNet)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def calibrate_ranges(src: Path, samples: Iterable[Mapping[str, np.ndarray]], *, op_types: Iterable[str],
                     exclude: Iterable[str] = (), threads: int | None = None,
                     label: str | None = None) -> dict[str, tuple]:
    """MinMax range of every tensor ``quantize_static`` needs, over ``samples``:
    tensor name -> (lowest, highest), float32 arrays of shape (1,) as ORT's
    calibrator returns them. Writes ``<src stem>.calib-<id>.onnx`` (graph only,
    referencing ``src``'s weights file) beside ``src`` for the time it runs.
    With ``label``, reports each sample with the time left on stderr (export/eta.py)."""
    import onnx

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    tensors = tensors_to_calibrate(model, op_types, exclude)
    pairs = augment(model, tensors)
    del model.graph.value_info[:]  # not needed to run; keeps the file small
    aug = src.with_name(f"{src.stem}.calib-{uuid.uuid4().hex[:8]}.onnx")
    onnx.save_model(model, str(aug))
    del model
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    try:
        sess = _session(aug, threads or min(2, os.cpu_count() or 1))
        names = [n for p in pairs for n in p]
        samples = list(samples)
        eta = None
        if label:
            from .eta import Eta
            eta = Eta(label, len(samples), unit="UNet input")
        for feeds in samples:
            outs = dict(zip(names, sess.run(names, dict(feeds))))
            for t, (lo, hi) in zip(tensors, pairs):
                # ORT's calibrator: np.nanmin / np.nanmax over the samples' shape-(1,) values
                lows.setdefault(t, []).append(np.asarray(outs[lo], dtype=np.float32).reshape(1))
                highs.setdefault(t, []).append(np.asarray(outs[hi], dtype=np.float32).reshape(1))
            del outs
            if eta is not None:
                eta.update()
        if eta is not None:
            eta.close()
        del sess
    finally:
        aug.unlink(missing_ok=True)
        gc.collect()
    if not lows:
        if not tensors:
            return {}
        raise ValueError("no calibration data: the sample list is empty")
    return {t: (np.nanmin(lows[t], axis=0), np.nanmax(highs[t], axis=0)) for t in tensors}


def save_cache(ranges: Mapping[str, tuple], path: Path) -> None:
    """The calibration cache ``quantize_static(calibration_cache_path=...)`` reads."""
    from onnxruntime.quantization import CalibrationMethod, save_tensors_data
    from onnxruntime.quantization.calibrate import TensorsData

    save_tensors_data(TensorsData(CalibrationMethod.MinMax, dict(ranges)), Path(path), smooth_quant=False)


def in_child(fn, *args):
    """``fn(*args)`` in a fresh (spawned) Python process; returns its result and
    re-raises its exception. ORT's quantization steps on the SD 1.5 UNet touch
    several GB (weights, activations, protobufs): in a child all of it goes back
    to the system when it ends, instead of staying in the export's heap for the
    steps after. ``fn`` must be a module-level function, ``args`` picklable."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from cpuflow.errors import ExportError

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise ExportError(f"{getattr(fn, '__name__', fn)}: its worker process died (killed for memory?)",
                              hint="free memory (close other jobs) and export again") from None
