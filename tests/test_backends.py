"""Backends, device selection, compiled cache, CPU features and the ONNX
external-data guard, on tiny ONNX graphs built with onnx.helper (no torch)."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper as oh, numpy_helper as nh  # noqa: E402

from cpuflow.backends import cache as cache_mod  # noqa: E402
from cpuflow.backends.base import BackendOptions, get_backend  # noqa: E402
from cpuflow.backends.device import (CPU_PROVIDER, CUDA_PROVIDER, cuda_fallback_message,  # noqa: E402
                                     normalize_device, openvino_device, select_providers)
from cpuflow.backends.onnx_external import check_external_data, external_data_locations  # noqa: E402
from cpuflow.cpu import cpu_features, default_threads, describe, parse_cpuinfo, physical_cores  # noqa: E402
from cpuflow.errors import (BackendError, InvalidArgument, MissingDependency, ModelError,  # noqa: E402
                            UnsafeFileError)
from cpuflow.manifest import TensorSpec  # noqa: E402

BACKEND_NAMES = ("openvino", "onnxruntime")
W_SHAPE = (8, 8)
INPUTS = (
    TensorSpec("sample", "float32", ("batch", 4, "latent_height", 8)),
    TensorSpec("timestep", "int64", (1,)),
)
OUTPUTS = (TensorSpec("out_sample", "float32", ("batch", 4, "latent_height", 8)),)


# --- model builders --------------------------------------------------------------
def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(W_SHAPE).astype(np.float32) * 0.3, rng.standard_normal(8).astype(np.float32) * 0.1


def _graph(w: np.ndarray, b: np.ndarray, *, out_name: str = "out_sample", name: str = "g"):
    nodes = [
        oh.make_node("MatMul", ["sample", "W"], ["mm"]),
        oh.make_node("Add", ["mm", "B"], ["pre"]),
        oh.make_node("Tanh", ["pre"], ["act"]),
        oh.make_node("Cast", ["timestep"], ["tf"], to=TensorProto.FLOAT),
        oh.make_node("Mul", ["act", "tf"], [out_name]),
    ]
    return oh.make_graph(
        nodes, name,
        [oh.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 4, "latent_height", 8]),
         oh.make_tensor_value_info("timestep", TensorProto.INT64, [1])],
        [oh.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 4, "latent_height", 8])],
        [nh.from_array(w, "W"), nh.from_array(b, "B")],
    )


def _model(graph):
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], producer_name="cpuflow-test")
    m.ir_version = 8
    return m


def make_onnx(path: Path, *, seed: int = 0, external: str | None = None, out_name: str = "out_sample") -> Path:
    w, b = _weights(seed)
    m = _model(_graph(w, b, out_name=out_name))
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        (path.parent / external).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=0)
    else:
        onnx.save_model(m, str(path))
    return path


def reference(feeds, seed: int = 0) -> np.ndarray:
    w, b = _weights(seed)
    return np.tanh(feeds["sample"] @ w + b) * feeds["timestep"].astype(np.float32)


def feeds_for(batch: int = 2, lh: int = 6, t: int = 3):
    rng = np.random.default_rng(batch * 100 + lh)
    return {"sample": rng.standard_normal((batch, 4, lh, 8)).astype(np.float32),
            "timestep": np.array([t], dtype=np.int64)}


def _mark_external(tensor, location: str) -> None:
    """Make an initializer point at ``location`` without writing any data."""
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(tensor.raw_data) or 256))):
        e = tensor.external_data.add()
        e.key, e.value = k, v
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def make_evil(path: Path, location: str, *, where: str = "initializer") -> Path:
    w, b = _weights()
    g = _graph(w, b)
    if where == "initializer":
        _mark_external(g.initializer[0], location)
    elif where == "subgraph":  # an If whose then-branch holds the external initializer
        sub_w = nh.from_array(np.ones(2, np.float32), "sub_w")
        _mark_external(sub_w, location)
        then_g = oh.make_graph([oh.make_node("Identity", ["sub_w"], ["y"])], "then", [],
                               [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [sub_w])
        else_g = oh.make_graph([oh.make_node("Identity", ["sub_e"], ["y"])], "else", [],
                               [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                               [nh.from_array(np.zeros(2, np.float32), "sub_e")])
        g.initializer.append(nh.from_array(np.array(True), "cond"))
        g.node.append(oh.make_node("If", ["cond"], ["unused"], then_branch=then_g, else_branch=else_g))
    elif where == "sparse":
        vals = nh.from_array(np.ones(2, np.float32), "sp_values")
        _mark_external(vals, location)
        idx = nh.from_array(np.array([0, 1], np.int64), "sp_idx")
        g.sparse_initializer.append(oh.make_sparse_tensor(vals, idx, [4]))
    else:
        raise AssertionError(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_model(g).SerializeToString())
    return path


def load(name: str, model_file: Path, *, static_dims=None, cache_key: str = "tiny-fp32", inputs=INPUTS,
         outputs=OUTPUTS, **opts):
    if name == "openvino":
        opts.setdefault("precision", "f32")
    return get_backend(name, BackendOptions(**opts)).load(
        "unet", model_file, inputs, outputs, static_dims=static_dims, cache_key=cache_key)


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return make_onnx(tmp_path / "model" / "unet.onnx")


# --- device / provider selection -----------------------------------------------------
def test_select_providers_cpu_only_runtime():
    avail = ["AzureExecutionProvider", CPU_PROVIDER]
    assert select_providers("cpu", avail) == [CPU_PROVIDER]
    assert select_providers("auto", avail) == [CPU_PROVIDER]
    with pytest.raises(MissingDependency, match="install onnxruntime-gpu and a CUDA driver"):
        select_providers("cuda", avail)


def test_select_providers_cuda_present():
    avail = [CUDA_PROVIDER, CPU_PROVIDER]
    assert select_providers("auto", avail) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert select_providers("cuda", avail) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert select_providers("CPU", avail) == [CPU_PROVIDER]


def test_select_providers_never_picks_tensorrt():
    avail = ["TensorrtExecutionProvider", CUDA_PROVIDER, CPU_PROVIDER]
    assert select_providers("auto", avail) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert select_providers("cuda", avail) == [CUDA_PROVIDER, CPU_PROVIDER]
    with pytest.raises(MissingDependency):
        select_providers("cuda", ["TensorrtExecutionProvider", CPU_PROVIDER])


def test_device_validation():
    with pytest.raises(InvalidArgument, match="device must be one of"):
        normalize_device("gpu")
    assert openvino_device("auto") == openvino_device("cpu") == "CPU"
    with pytest.raises(InvalidArgument, match="onnxruntime"):
        openvino_device("cuda")
    with pytest.raises(InvalidArgument, match="onnxruntime backend"):
        get_backend("openvino", BackendOptions(device="cuda"))
    assert cuda_fallback_message([CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER])
    assert cuda_fallback_message([CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]) is None
    assert cuda_fallback_message([CPU_PROVIDER], [CPU_PROVIDER]) is None


def test_option_validation():
    with pytest.raises(InvalidArgument, match="use --backend openvino for bf16"):
        get_backend("onnxruntime", BackendOptions(precision="bf16"))
    with pytest.raises(InvalidArgument, match="precision"):
        get_backend("openvino", BackendOptions(precision="int4"))
    for name in BACKEND_NAMES:
        with pytest.raises(InvalidArgument, match="threads"):
            get_backend(name, BackendOptions(threads=0))
    import onnxruntime
    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        with pytest.raises(MissingDependency, match="onnxruntime-gpu"):
            get_backend("onnxruntime", BackendOptions(device="cuda"))


def test_cuda_libraries_preloaded_once_and_only_for_cuda(monkeypatch, capsys):
    """onnxruntime-gpu[cuda,cudnn] keeps CUDA / cuDNN in site-packages: the backend asks ORT to
    load them (preload_dlls) before its first CUDA session, once, never for the CPU, with ORT's
    prints on stderr (stdout may carry --json)."""
    import types

    from cpuflow.backends import onnxruntime_backend as ob

    calls = []
    fake = types.SimpleNamespace(
        __version__="0", get_available_providers=lambda: [CUDA_PROVIDER, CPU_PROVIDER],
        preload_dlls=lambda: (calls.append(1), print("ORT says hello")))
    monkeypatch.setattr(ob, "_import_ort", lambda: fake)
    monkeypatch.setattr(ob, "_PRELOADED", set())
    get_backend("onnxruntime", BackendOptions(device="cpu"))
    assert calls == []
    get_backend("onnxruntime", BackendOptions(device="cuda"))
    get_backend("onnxruntime", BackendOptions(device="auto"))
    assert calls == [1]
    out = capsys.readouterr()
    assert "ORT says hello" in out.err and "ORT says hello" not in out.out
    # an ORT without preload_dlls (older than 1.21), or one whose preload fails: no error here
    monkeypatch.setattr(ob, "_PRELOADED", set())
    assert ob.preload_cuda_libraries(types.SimpleNamespace()) is False
    assert ob.preload_cuda_libraries(types.SimpleNamespace(preload_dlls=lambda: 1 / 0)) is True


# --- running ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_dynamic_shapes_match_numpy(name, tiny):
    s = load(name, tiny)
    assert s.info.backend == name
    assert s.info.cached is False and s.info.compile_s > 0
    assert s.info.precision == "f32"
    if name == "openvino":
        assert s.info.device == "CPU"
    else:
        assert s.info.device == CPU_PROVIDER
    for batch, lh in ((1, 4), (2, 6)):
        f = feeds_for(batch, lh)
        out = s.run(f)
        assert set(out) == {"out_sample"}
        assert out["out_sample"].shape == (batch, 4, lh, 8)
        np.testing.assert_allclose(out["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    s.close()


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_static_dims_and_wrong_batch(name, tiny):
    s = load(name, tiny, static_dims={"batch": 2, "latent_height": 6})
    f = feeds_for(2, 6)
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    # the caller's arrays are not modified (share_inputs) and outputs are not aliased between runs
    before = f["sample"].copy()
    a = s.run(f)["out_sample"]
    b = s.run(feeds_for(2, 6, t=5))["out_sample"]
    np.testing.assert_array_equal(f["sample"], before)
    assert not np.shares_memory(a, b)
    with pytest.raises(BackendError, match=r"unet\.sample: dimension 0 must be 2, got 3"):
        s.run(feeds_for(3, 6))
    with pytest.raises(BackendError, match=r"sample: dimension 2 must be 6, got 4"):
        s.run(feeds_for(2, 4))


def test_openvino_static_reshape_is_compiled(tiny):
    s = load("openvino", tiny, static_dims={"batch": 2, "latent_height": 6})
    shape = s._compiled.inputs[0].get_partial_shape()
    assert shape.is_static and list(shape.to_shape()) == [2, 4, 6, 8]
    # a dim not given stays dynamic
    s2 = load("openvino", tiny, static_dims={"batch": 1})
    assert str(s2._compiled.inputs[0].get_partial_shape()) == "[1,4,?,8]"
    f = feeds_for(1, 5)
    np.testing.assert_allclose(s2.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_feed_checks(name, tiny):
    s = load(name, tiny)
    f = feeds_for()
    with pytest.raises(BackendError, match=r"missing \['timestep'\]"):
        s.run({"sample": f["sample"]})
    with pytest.raises(BackendError, match=r"unexpected \['extra'\]"):
        s.run({**f, "extra": f["timestep"]})
    with pytest.raises(BackendError, match="expected dtype float32, got float64"):
        s.run({**f, "sample": f["sample"].astype(np.float64)})
    with pytest.raises(BackendError, match="expected rank 4"):
        s.run({**f, "sample": f["sample"][0]})
    with pytest.raises(BackendError, match="numpy array"):
        s.run({**f, "timestep": [3]})


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_manifest_model_name_mismatch(name, tmp_path):
    m = make_onnx(tmp_path / "m" / "unet.onnx", out_name="noise_pred")
    with pytest.raises(BackendError, match=r"outputs \['noise_pred'\] do not match the manifest's \['out_sample'\]"):
        load(name, m)
    bad_in = (TensorSpec("latents", "float32", ("batch", 4, "latent_height", 8)), INPUTS[1])
    with pytest.raises(BackendError, match="inputs"):
        load(name, make_onnx(tmp_path / "n" / "unet.onnx"), inputs=bad_in)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_manifest_model_dtype_mismatch(name, tiny):
    bad = (INPUTS[0], TensorSpec("timestep", "int32", (1,)))
    with pytest.raises(BackendError, match=r"timestep: the model takes int64, the manifest says int32"):
        load(name, tiny, inputs=bad)


def test_threads_option(tiny):
    ov_s = load("openvino", tiny, threads=1)
    assert int(ov_s.get_property("INFERENCE_NUM_THREADS")) == 1
    assert str(ov_s.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    ort_s = load("onnxruntime", tiny, threads=1)
    so = ort_s._session.get_session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    f = feeds_for()
    for s in (ov_s, ort_s):
        np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)


def test_openvino_auto_precision_reports_what_runs(tiny):
    s = load("openvino", tiny, precision="auto")
    assert s.info.precision in ("f32", "bf16", "f16")
    f = feeds_for()
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=0.1)  # bf16 on AMX/AVX512-BF16


def test_openvino_bf16_request(tiny):
    s = load("openvino", tiny, precision="bf16")
    feats = cpu_features(use_openvino=False)
    if feats["bf16"]:
        assert s.info.precision == "bf16"
    f = feeds_for()
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=0.1)


# --- compiled cache ---------------------------------------------------------------------------
def test_openvino_compiled_cache(tiny, tmp_path):
    root = tmp_path / "cache"
    first = load("openvino", tiny, cache_dir=root, static_dims={"batch": 1, "latent_height": 6})
    second = load("openvino", tiny, cache_dir=root, static_dims={"batch": 1, "latent_height": 6})
    assert first.info.cached is False
    assert second.info.cached is True
    assert first.cache_dir == second.cache_dir
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(first.cache_dir).st_mode) == 0o700
    assert list(first.cache_dir.glob("*.blob"))
    f = feeds_for(1, 6)
    np.testing.assert_allclose(second.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    # other static dims or precision -> another subfolder, compiled afresh
    other = load("openvino", tiny, cache_dir=root, static_dims={"batch": 2, "latent_height": 6})
    assert other.info.cached is False and other.cache_dir != first.cache_dir
    other_key = load("openvino", tiny, cache_dir=root, static_dims={"batch": 1, "latent_height": 6},
                     cache_key="other-weights")
    assert other_key.info.cached is False and other_key.cache_dir != first.cache_dir
    assert len(cache_mod.cache_entries(root)) == 3


def test_openvino_cache_hit_imports_the_blob_without_reading_the_model(tiny, tmp_path, monkeypatch):
    """A warm start imports the one digest-checked blob of its cache folder in place (a
    copy-on-write map of the file), without read_model: OpenVINO's own lookup reads and
    hashes the whole IR first (+0.8 GB peak for SD 1.5 int8, bench/README.md)."""
    from cpuflow.backends import openvino_backend as ovb

    root = tmp_path / "cache"
    dims = {"batch": 1, "latent_height": 6}
    first = load("openvino", tiny, cache_dir=root, static_dims=dims)
    assert first.info.cached is False and first._blob is None
    import openvino as ov

    def no_read(*a, **k):
        raise AssertionError("the model was read on a cache hit")
    monkeypatch.setattr(ov.Core, "read_model", no_read)
    second = load("openvino", tiny, cache_dir=root, static_dims=dims)
    assert second.info.cached is True and second._blob is not None and second.cache_dir == first.cache_dir
    f = feeds_for(1, 6)
    np.testing.assert_allclose(second.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    second.close()
    assert second._blob is None
    monkeypatch.undo()

    # a blob whose header this code does not know falls back to OpenVINO's own path (still a hit)
    (blob,) = first.cache_dir.glob("*.blob")
    assert ovb.cached_blob_payload(blob, ov.get_version()) is not None
    assert ovb.cached_blob_payload(blob, "1999.0") is None
    monkeypatch.setattr(ovb, "cached_blob_payload", lambda *a: None)
    third = load("openvino", tiny, cache_dir=root, static_dims=dims)
    assert third.info.cached is True and third._blob is None
    np.testing.assert_allclose(third.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)


def test_openvino_fast_cache_hit_still_refuses_a_damaged_blob(tiny, tmp_path):
    root = tmp_path / "cache"
    dims = {"batch": 1, "latent_height": 6}
    first = load("openvino", tiny, cache_dir=root, static_dims=dims)
    (blob,) = first.cache_dir.glob("*.blob")
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    os.chmod(blob, 0o600)
    blob.write_bytes(bytes(data))
    again = load("openvino", tiny, cache_dir=root, static_dims=dims)
    assert again.info.cached is False and again._blob is None
    assert "damaged blob" in (again.info.warning or "")
    f = feeds_for(1, 6)
    np.testing.assert_allclose(again.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)


def test_openvino_without_cache_dir(tiny):
    s = load("openvino", tiny)
    assert s.cache_dir is None and s.info.cached is False


def _saved_graph(session_info_root):
    (sub,) = [p for p in cache_mod.cache_entries(session_info_root) if p.parent.name == "onnxruntime"]
    return sub / "optimized"


def test_onnxruntime_saves_its_optimised_graph_and_loads_it_next_start(tiny, tmp_path):
    root = tmp_path / "cache"
    dims = {"batch": 1, "latent_height": 6}
    first = load("onnxruntime", tiny, cache_dir=root, static_dims=dims)
    saved = _saved_graph(root)
    assert first.info.cached is False and first.info.warning is None
    assert (saved / "model.onnx").is_file() and (saved / "cpuflow-blobs.json").is_file()
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".tmp-")]   # no leftovers
    second = load("onnxruntime", tiny, cache_dir=root, static_dims=dims)
    assert second.info.cached is True and second.info.warning is None
    f = feeds_for(1, 6)
    np.testing.assert_array_equal(second.run(f)["out_sample"], first.run(f)["out_sample"])
    np.testing.assert_allclose(second.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    # other static dims: another graph, optimised afresh
    other = load("onnxruntime", tiny, cache_dir=root, static_dims={"batch": 2, "latent_height": 6})
    assert other.info.cached is False
    assert len([p for p in cache_mod.cache_entries(root) if p.parent.name == "onnxruntime"]) == 2


def test_onnxruntime_damaged_saved_graph_is_optimised_again(tiny, tmp_path):
    root = tmp_path / "cache"
    load("onnxruntime", tiny, cache_dir=root)
    graph = _saved_graph(root) / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-5] ^= 0xFF                       # a flipped byte: the file's sha256 no longer matches
    graph.write_bytes(bytes(data))
    again = load("onnxruntime", tiny, cache_dir=root)
    assert again.info.cached is False
    assert "damaged" in again.info.warning
    f = feeds_for(1, 6)
    np.testing.assert_allclose(again.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    assert load("onnxruntime", tiny, cache_dir=root).info.cached is True   # saved afresh


def test_onnxruntime_half_saved_graph_is_not_trusted(tiny, tmp_path):
    root = tmp_path / "cache"
    load("onnxruntime", tiny, cache_dir=root)
    (_saved_graph(root) / "cpuflow-blobs.json").unlink()   # killed between the rename and the record
    assert load("onnxruntime", tiny, cache_dir=root).info.cached is False
    assert load("onnxruntime", tiny, cache_dir=root).info.cached is True


def test_onnxruntime_without_cache_dir_writes_nothing(tiny, tmp_path):
    s = load("onnxruntime", tiny)
    assert s.info.cached is False
    assert not list(tmp_path.rglob("optimized"))


# --- OpenVINO IR -------------------------------------------------------------------------
def test_openvino_reads_ir(tiny, tmp_path):
    import openvino as ov
    xml = tmp_path / "ir" / "unet.xml"
    xml.parent.mkdir()
    ov.save_model(ov.convert_model(str(tiny)), str(xml), compress_to_fp16=False)
    assert xml.with_suffix(".bin").is_file()
    s = load("openvino", xml, static_dims={"batch": 2, "latent_height": 6})
    f = feeds_for(2, 6)
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="reads .onnx"):
        load("onnxruntime", xml)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ModelError, match="no weights file"):
        load("openvino", xml)


def test_missing_model_file(tmp_path):
    for name in BACKEND_NAMES:
        with pytest.raises(ModelError, match="missing"):
            load(name, tmp_path / "nope.onnx")


# --- external data ------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_external_data_model_runs(name, tmp_path):
    m = make_onnx(tmp_path / "ext" / "unet.onnx", external="weights/unet.onnx_data")
    assert (tmp_path / "ext" / "weights" / "unet.onnx_data").is_file()
    assert external_data_locations(m) == ["weights/unet.onnx_data"]
    assert check_external_data(m) == [tmp_path / "ext" / "weights" / "unet.onnx_data"]
    s = load(name, m, static_dims={"batch": 1, "latent_height": 3})
    f = feeds_for(1, 3)
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)


def test_walker_agrees_with_onnx(tmp_path):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    m = make_onnx(tmp_path / "a" / "x.onnx", external="x.data")
    proto = onnx.load(str(m), load_external_data=False)
    want = sorted({e.value for t in _get_all_tensors(proto) if uses_external_data(t)
                   for e in t.external_data if e.key == "location"})
    assert sorted(external_data_locations(m)) == want == ["x.data"]
    assert external_data_locations(make_onnx(tmp_path / "b" / "y.onnx")) == []


@pytest.fixture()
def no_backend_reads(monkeypatch):
    """Any attempt by a backend to open the model fails the test."""
    import onnxruntime

    def boom(*a, **k):
        raise AssertionError("a backend read the model before the external-data check")

    monkeypatch.setattr(onnxruntime, "InferenceSession", boom)

    class FakeCore:
        read_model = compile_model = staticmethod(boom)

    def make(name):
        b = get_backend(name, BackendOptions(precision="f32" if name == "openvino" else "auto"))
        if name == "openvino":
            b._core = FakeCore()
        return b
    return make


def _escape_cases(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.bin").write_bytes(b"\0" * 512)
    (tmp_path / "evil.bin").write_bytes(b"\0" * 512)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(outside / "evil.bin", model_dir / "link.bin")
    return [
        ("../evil.bin", "initializer"),
        ("/etc/passwd", "initializer"),
        (str(outside / "evil.bin"), "initializer"),
        ("link.bin", "initializer"),
        ("sub/../../evil.bin", "initializer"),
        ("*/_ORT_MEM_ADDR_/*", "initializer"),
        ("../evil.bin", "subgraph"),
        ("/etc/passwd", "sparse"),
    ]


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_external_data_escapes_refused_before_backend_reads(name, tmp_path, no_backend_reads):
    backend = no_backend_reads(name)
    for i, (loc, where) in enumerate(_escape_cases(tmp_path)):
        m = make_evil(tmp_path / "model" / f"evil{i}.onnx", loc, where=where)
        with pytest.raises(UnsafeFileError) as ei:
            backend.load("unet", m, INPUTS, OUTPUTS, static_dims=None, cache_key="k")
        assert repr(loc) in str(ei.value), (loc, str(ei.value))


def test_external_data_special_files(tmp_path):
    d = tmp_path / "m"
    (d / "dir.bin").mkdir(parents=True)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        check_external_data(make_evil(d / "a.onnx", "dir.bin"))
    with pytest.raises(ModelError, match="missing"):
        check_external_data(make_evil(d / "b.onnx", "absent.bin"))
    # external without any location
    w, b = _weights()
    g = _graph(w, b)
    g.initializer[0].ClearField("raw_data")
    g.initializer[0].data_location = TensorProto.EXTERNAL
    p = d / "c.onnx"
    p.write_bytes(_model(g).SerializeToString())
    with pytest.raises(UnsafeFileError, match="names no location"):
        check_external_data(p)


def test_walker_refuses_damaged_files(tmp_path, tiny):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        external_data_locations(empty)
    data = tiny.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) - 7])
    with pytest.raises(ModelError, match="not a valid ONNX protobuf"):
        external_data_locations(cut)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError):
        external_data_locations(junk)


# --- cache.py ----------------------------------------------------------------------------
def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CPUFLOW_CACHE_DIR", str(tmp_path / "c1"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.default_cache_dir() == tmp_path / "c1"
    monkeypatch.delenv("CPUFLOW_CACHE_DIR")
    assert cache_mod.default_cache_dir() == tmp_path / "xdg" / "cpuflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.default_cache_dir() == tmp_path / "home" / ".cache" / "cpuflow"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec: ignored
    assert cache_mod.default_cache_dir() == tmp_path / "home" / ".cache" / "cpuflow"


def test_ensure_private_dir_tightens(tmp_path):
    d = tmp_path / "wide"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    assert cache_mod.ensure_private_dir(d) == d
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    new = cache_mod.ensure_private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o700
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidArgument):
        cache_mod.ensure_private_dir(f)


def test_model_cache_dir_keying(tmp_path):
    kw = dict(static_dims={"batch": 1, "height": 512}, precision="f32", runtime_version="2026.4")
    a = cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **kw)
    assert a == cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **kw)
    assert a.parent == tmp_path / "openvino" and a.name.startswith("abc123_fp32-")
    assert (a / cache_mod.MARKER).is_file()
    others = {
        cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **{**kw, "precision": "bf16"}),
        cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **{**kw, "static_dims": {"batch": 2, "height": 512}}),
        cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **{**kw, "runtime_version": "2026.5"}),
        cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **{**kw, "static_dims": None}),
        cache_mod.model_cache_dir(tmp_path, "zzz/fp32", **kw),
    }
    assert len(others) == 5 and a not in others
    # dict order does not matter
    assert a == cache_mod.model_cache_dir(tmp_path, "abc123/fp32", **{**kw, "static_dims": {"height": 512, "batch": 1}})


def _open_cache_many_times(root, n):
    for _ in range(n):
        cache_mod.model_cache_dir(root, "race/unet-fp32", static_dims=None, precision="f32",
                                  runtime_version="x")


def test_model_cache_dir_is_safe_when_processes_open_it_at_once(tmp_path):
    # CI found this: two Ray actors on one node opening the same model both saw no
    # marker, both wrote the same .tmp, and the second rename failed the job.
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for attempt in range(5):
        root = tmp_path / f"r{attempt}"
        procs = [ctx.Process(target=_open_cache_many_times, args=(root, 1)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 6
        (sub,) = cache_mod.cache_entries(root)
        assert json.loads((sub / cache_mod.MARKER).read_text())["cache_key"] == "race/unet-fp32"
        assert not list(sub.glob("*.tmp"))


def test_model_cache_dir_survives_a_vanished_temporary(tmp_path, monkeypatch):
    # the rename losing its source (another process won) is not an error
    def replace_missing(src, dst):
        os.unlink(src)
        raise FileNotFoundError(src)

    monkeypatch.setattr(cache_mod.os, "replace", replace_missing)
    sub = cache_mod.model_cache_dir(tmp_path, "m", static_dims=None, precision="f32", runtime_version="x")
    assert sub.is_dir() and not list(sub.glob("*.tmp"))


def test_prune_lru(tmp_path):
    kw = dict(static_dims=None, precision="f32", runtime_version="x")
    dirs = []
    for i in range(4):
        d = cache_mod.model_cache_dir(tmp_path, f"m{i}", **kw)
        (d / "0.blob").write_bytes(b"\0" * 1000)
        os.utime(d / cache_mod.MARKER, (1000 + i, 1000 + i))
        dirs.append(d)
    cache_mod.touch(dirs[0])  # just used: now the newest
    stray = tmp_path / "not-ours"
    stray.mkdir()
    (stray / "big").write_bytes(b"\0" * 10_000)
    total = cache_mod.cache_size(tmp_path)
    assert 4000 < total < 5000
    removed = cache_mod.prune(tmp_path, 2500, keep=[dirs[1]])
    assert removed == [dirs[2], dirs[3]]  # dirs[1] is older but kept; dirs[0] was touched
    assert dirs[0].exists() and dirs[1].exists()
    assert stray.exists() and (stray / "big").exists()  # only marked folders are ever deleted
    assert cache_mod.prune(tmp_path, 10**9) == []
    assert cache_mod.prune(tmp_path / "absent", 0) == []


# --- cpu.py ----------------------------------------------------------------------------
_CPUINFO_AMX = "\n\n".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    f"physical id\t: {i // 4}\nsiblings\t: 4\ncore id\t\t: {(i % 4) // 2}\ncpu cores\t: 2\n"
    "flags\t\t: fpu sse avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
    for i in range(8)) + "\n"


def test_parse_cpuinfo_amx_two_sockets():
    info = parse_cpuinfo(_CPUINFO_AMX)
    assert info["logical_cores"] == 8 and info["physical_cores"] == 4
    f = cpu_features(_CPUINFO_AMX, use_openvino=False)
    assert f["model_name"].startswith("Intel(R) Xeon")
    assert f["amx_bf16"] and f["amx_int8"] and f["amx"] and f["bf16"] and f["vnni"] and f["avx512f"]
    assert not f["avx_vnni"]
    assert "amx_bf16" in describe(f)


def test_parse_cpuinfo_sparse_and_empty():
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t: sse2 avx2 avx_vnni\n\nprocessor\t: 1\nmodel name\t: Some CPU\n"
    f = cpu_features(text, use_openvino=False)
    assert f["avx2"] and f["vnni"] and not f["bf16"] and not f["avx512f"]
    assert f["logical_cores"] == 2 and f["physical_cores"] == 2  # no core ids: falls back to logical
    empty = cpu_features("", use_openvino=False)
    assert empty["logical_cores"] >= 1 and empty["source"] == "platform" and not empty["avx2"]


def test_cpu_features_this_machine():
    f = cpu_features()
    for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "bf16", "model_name",
              "logical_cores", "physical_cores", "usable_cores"):
        assert k in f
    assert 1 <= f["physical_cores"] <= f["logical_cores"]
    assert physical_cores() >= 1 and 1 <= default_threads() <= f["logical_cores"]


def test_cache_detection_fallback_compares_blobs(tmp_path):
    """Without LOADED_FROM_CACHE, a blob that was there before and is unchanged means 'from cache'."""
    from cpuflow.backends.openvino_backend import OpenVINOBackend, _blob_state

    class NoProp:
        def get_property(self, name):
            raise RuntimeError("unsupported property")

    d = tmp_path / "sub"
    d.mkdir()
    empty = _blob_state(d)
    (d / "1.blob").write_bytes(b"x")
    written = _blob_state(d)
    assert OpenVINOBackend._loaded_from_cache(NoProp(), empty, written, d) is False   # compiled, blob written
    assert OpenVINOBackend._loaded_from_cache(NoProp(), written, _blob_state(d), d) is True  # blob reused
    assert OpenVINOBackend._loaded_from_cache(NoProp(), {}, {}, d) is False  # cache not writable
    assert OpenVINOBackend._loaded_from_cache(NoProp(), written, written, None) is False  # no cache dir


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / /proc are Linux's")
@pytest.mark.parametrize("warm", [False, True])
def test_openvino_low_memory_drops_the_mapped_weight_pages_during_the_first_call(tiny, tmp_path, monkeypatch, warm):
    """--low-memory (BackendOptions.page_out_weights): while the plugin packs its own copy of the
    weights (compile / import and the first call), the pages of the mapped weight file (IR .bin,
    or the cache blob imported in place) are paged out: SD 1.5 int8 at 512x512 peaked at 2.84 ->
    1.53-1.60 GB (bench/README.md). The outputs are the same; later calls do nothing extra."""
    from cpuflow import mapped_pages

    ir = tmp_path / "ir" / "unet.xml"
    import openvino as ov
    ov.save_model(ov.Core().read_model(str(tiny)), str(ir), compress_to_fp16=False)
    root = tmp_path / "cache"
    dims = {"batch": 1, "latent_height": 6}
    if warm:
        load("openvino", ir, cache_dir=root, static_dims=dims)
    advised = []
    real = mapped_pages.page_out
    monkeypatch.setattr(mapped_pages, "page_out", lambda paths: advised.append(sorted(map(str, paths))) or real(paths))
    s = load("openvino", ir, cache_dir=root, static_dims=dims, page_out_weights=True)
    assert s.info.cached is warm and (s._blob is not None) is warm
    want = [str(p) for p in sorted(s.cache_dir.glob("*.blob"))] if warm else [str(ir.with_suffix(".bin"))]
    assert advised and all(set(a) <= set(want + [str(p) for p in s.cache_dir.glob("*.blob")]) for a in advised)
    assert s.page_out_paths
    n = len(advised)
    f = feeds_for(1, 6)
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    assert len(advised) > n and s.page_out_paths is None
    n = len(advised)
    np.testing.assert_allclose(s.run(f)["out_sample"], reference(f), atol=1e-5, rtol=1e-5)
    assert len(advised) == n   # the first call only
    plain = load("openvino", ir, cache_dir=tmp_path / "other", static_dims=dims)
    assert plain.page_out_paths is None


def test_onnxruntime_low_memory_runs_without_the_cpu_arena(tiny):
    """--low-memory turns ORT's CPU memory arena off (the arena keeps the most a call took:
    GBs on a full-size UNet); the outputs are the same."""
    from cpuflow.config import LoadConfig
    from cpuflow.pipelines.model import LoadedModel

    on = load("onnxruntime", tiny)
    off = load("onnxruntime", tiny, cpu_arena=False)
    assert on._session.get_session_options().enable_cpu_mem_arena is True
    assert off._session.get_session_options().enable_cpu_mem_arena is False
    f = feeds_for()
    np.testing.assert_array_equal(on.run(f)["out_sample"], off.run(f)["out_sample"])
    for low, arena in ((True, False), (False, True)):
        model = LoadedModel(LoadConfig(backend="onnxruntime", low_memory=low, use_cache=False))
        assert model.options.cpu_arena is arena and model.options.page_out_weights is low


def test_openvino_compiles_again_when_another_process_wrote_the_same_cache_entry(tiny, tmp_path, monkeypatch):
    """CI saw two Ray workers on one node compile the same model into one cache: OpenVINO failed with
    "filesystem error: cannot set permissions: No such file or directory [<cache>/<n>.blob]". Such a
    failure (a file of this cache folder) is compiled again; any other failure is not."""
    import openvino as ov
    real, calls = ov.Core.compile_model, []

    def colliding(self, model, device=None, config=None):
        calls.append(dict(config or {}))
        cache = (config or {}).get("CACHE_DIR")
        if cache and len(calls) == 1:
            raise RuntimeError(f"Exception from src/inference/src/cpp/core.cpp: filesystem error: cannot set "
                               f"permissions: No such file or directory [{cache}/123.blob]")
        return real(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", colliding)
    s = load("openvino", tiny, cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and calls[0] == calls[1]
    x = np.zeros((1, 4, 8, 8), np.float32)
    assert np.isfinite(s.run({"sample": x, "timestep": np.array([1], np.int64)})["out_sample"]).all()
    calls.clear()

    def failing(self, model, device=None, config=None):
        calls.append(1)
        raise RuntimeError("filesystem error: cannot open [/elsewhere/x.blob]")

    monkeypatch.setattr(ov.Core, "compile_model", failing)
    with pytest.raises(BackendError):
        load("openvino", tiny, cache_dir=tmp_path / "cache2")
    assert len(calls) == 1
