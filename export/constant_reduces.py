"""NNCF's weight statistics, reduced in numpy instead of by OpenVINO's compile (issue #15 item 1).

``nncf.quantize`` finds its weight quantizers' ranges through its statistics model: the UNet
plus, for every quantized weight, a ``ReduceMin`` / ``ReduceMax`` (half of them over ``Abs``) of
the weight ``Constant``. OpenVINO's compile constant-folds those reduces with its reference
kernels, on one thread. On the SD 1.5 UNet that is 338 reduces over 1.3 G elements and about 50
of the ~60 s the statistics model takes to compile (the plain UNet compiles in ~10 s); numpy
does the same reductions in ~6 s. Min and max are exact, so the folded constants are the values
OpenVINO's folding makes and the int8 file is byte-identical (bench/README.md, "int8 export
cost", the NNCF stage table: statistics compile 60.7 -> 7.6 s).

:func:`weight_statistics_in_numpy` folds them in every ``ov.Core.compile_model`` made inside it.
It wraps OpenVINO's public compile call rather than an NNCF class, so it depends on no NNCF
internals: a future NNCF that builds its statistics another way just finds nothing to fold.
Only reduces whose data and axes are constants are touched; everything else compiles as before.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

_REDUCES = {"ReduceMin": np.min, "ReduceMax": np.max}


def _constant_input(op, i: int):
    node = op.input(i).get_source_output().get_node()
    return node if node.get_type_name() == "Constant" else None


def fold_constant_reduces(model: Any) -> int:
    """Replace each ReduceMin / ReduceMax of a Constant, or of Abs(Constant), with constant axes,
    by a Constant computed with numpy (same names). Returns how many were replaced."""
    from openvino import opset13
    n = 0
    for op in model.get_ops():
        reduce = _REDUCES.get(op.get_type_name())
        if reduce is None:
            continue
        axes = _constant_input(op, 1)
        src = op.input(0).get_source_output().get_node()
        take_abs = src.get_type_name() == "Abs"
        data = _constant_input(src, 0) if take_abs else (src if src.get_type_name() == "Constant" else None)
        if axes is None or data is None:
            continue
        x = data.get_data()
        if take_abs:
            x = np.abs(x)
        dims = tuple(sorted({int(a) % x.ndim for a in np.atleast_1d(axes.get_data())})) if x.ndim else ()
        value = reduce(x, axis=dims, keepdims=bool(op.get_attributes()["keep_dims"]))
        const = opset13.constant(np.ascontiguousarray(value, dtype=x.dtype))
        const.set_friendly_name(op.get_friendly_name())
        const.output(0).set_names(op.output(0).get_names())
        op.output(0).replace(const.output(0))
        n += 1
    return n


@contextlib.contextmanager
def weight_statistics_in_numpy() -> Iterator[list[int]]:
    """Inside: every ``ov.Core.compile_model`` of an ``ov.Model`` first folds its constant
    reduces in numpy. Yields the list of fold counts, one per compile (for tests and logs)."""
    import openvino as ov
    compile_model = ov.Core.compile_model
    folded: list[int] = []

    def folding_compile(self, model, *args, **kwargs):
        if isinstance(model, ov.Model):
            folded.append(fold_constant_reduces(model))
        return compile_model(self, model, *args, **kwargs)

    ov.Core.compile_model = folding_compile
    try:
        yield folded
    finally:
        ov.Core.compile_model = compile_model
