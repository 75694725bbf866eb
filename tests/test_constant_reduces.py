"""NNCF's weight statistics reduced in numpy (export/constant_reduces.py): the folded constants
are exactly what OpenVINO computes, only constant reduces are touched, and the int8 file NNCF
writes is byte-identical with and without the fold."""
from __future__ import annotations

import contextlib

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from export import constant_reduces


def _model() -> ov.Model:
    rng = np.random.default_rng(0)
    x = ops.parameter([1, 8, 6, 6], np.float32, name="x")
    w = ops.constant(rng.standard_normal((8, 8, 3, 3)).astype(np.float32))
    conv = ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])
    outs = [conv,
            ops.reduce_min(w, ops.constant(np.array([1, 2, 3], np.int64)), keep_dims=True),
            ops.reduce_max(ops.absolute(w), ops.constant(np.array([-1, 1, 2], np.int64)), keep_dims=True),
            ops.reduce_max(w, ops.constant(np.array([0], np.int64)), keep_dims=False),
            ops.reduce_min(conv, ops.constant(np.array([2, 3], np.int64)), keep_dims=True)]   # not constant
    return ov.Model([ops.result(o) for o in outs], [x], "reduces")


def _run(model: ov.Model) -> list[np.ndarray]:
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 6)).astype(np.float32)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [np.asarray(v) for v in compiled(x).values()]


def test_constant_reduces_fold_to_the_values_openvino_computes():
    want = _run(_model())
    model = _model()
    with constant_reduces.weight_statistics_in_numpy() as folded:
        got = _run(model)
    assert folded == [3]
    assert [op.get_type_name() for op in model.get_ops()].count("ReduceMin") == 1    # the activation's
    assert "ReduceMax" not in [op.get_type_name() for op in model.get_ops()]
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)


def test_the_compile_call_is_restored_after_the_block():
    before = ov.Core.compile_model
    with contextlib.suppress(RuntimeError):
        with constant_reduces.weight_statistics_in_numpy():
            assert ov.Core.compile_model is not before
            raise RuntimeError
    assert ov.Core.compile_model is before
