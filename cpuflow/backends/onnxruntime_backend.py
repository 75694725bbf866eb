"""The ONNX Runtime backend: ``.onnx`` files on the CPU, or on NVIDIA GPUs with
``onnxruntime-gpu`` (``CUDAExecutionProvider``).

Session options: ``intra_op_num_threads`` = ``options.threads`` (0 = ORT's
default, one per physical core), ``inter_op_num_threads`` = 1, sequential
execution, ``ORT_ENABLE_ALL`` graph optimisations, ORT's default memory arena
and memory-pattern planning. With ``static_dims`` each symbolic input
dimension of that name is pinned with ``add_free_dimension_override_by_name``
(the exporter names ONNX dims like the manifest), which lets ORT plan memory
for fixed shapes; the feeds are checked against the same values.

ORT has no bf16 inference hint on the CPU (use the openvino backend for bf16)
and no compiled-model cache: ``SessionInfo.cached`` is always False.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import BackendError, InvalidArgument, MissingDependency, ModelError
from ..manifest import TensorSpec
from .base import BackendOptions, SessionInfo, check_feeds
from .device import CPU_PROVIDER, cuda_fallback_message, normalize_device, select_providers
from .onnx_external import check_external_data

PRECISIONS = ("auto", "f32")

# ONNX Runtime's type strings -> numpy dtypes
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a runtime dependency
        raise MissingDependency(f"the onnxruntime backend needs the onnxruntime package ({e})",
                                hint="pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None
    return ort


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [RuntimeError, ValueError]
    state = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
    for n in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
              "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail",
              "ModelLoadCanceled"):
        c = getattr(state, n, None)
        if isinstance(c, type) and issubclass(c, BaseException):
            errs.append(c)
    return tuple(errs)


def _check_names(component: str, kind: str, specs: Sequence[TensorSpec], model_names: Sequence[str]) -> None:
    if sorted(s.name for s in specs) != sorted(model_names):
        raise BackendError(f"{component}: the model's {kind} {list(model_names)} do not match the manifest's "
                           f"{[s.name for s in specs]}",
                           hint="the model file and cpuflow.json come from different exports; re-export")


class OnnxRuntimeSession:
    def __init__(self, component: str, session: Any, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], static_dims: Mapping[str, int] | None,
                 info: SessionInfo, errors: tuple[type[BaseException], ...]):
        self.component = component
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.info = info
        self._session = session
        self._dims = dict(static_dims) if static_dims else None
        self._out_names = [s.name for s in outputs]
        self._errors = errors

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.component, self.inputs, feeds, self._dims)
        if self._session is None:
            raise BackendError(f"{self.component}: session is closed")
        try:
            res = self._session.run(self._out_names, dict(feeds))  # InferenceSession.run is thread-safe
        except self._errors as e:
            raise BackendError(f"{self.component}: onnxruntime inference failed: {e}") from None
        return dict(zip(self._out_names, res))

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> "OnnxRuntimeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, options: BackendOptions | None = None):
        options = options or BackendOptions()
        self.device = normalize_device(options.device)
        if options.precision == "bf16":
            raise InvalidArgument("the onnxruntime backend has no bf16 mode on the CPU; "
                                  "use --backend openvino for bf16 (or --precision f32)")
        if options.precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of auto, f32, bf16, got {options.precision!r}")
        if options.threads is not None and (not isinstance(options.threads, int) or isinstance(options.threads, bool)
                                            or options.threads < 1):
            raise InvalidArgument(f"threads must be a positive integer, got {options.threads!r}")
        self.options = options
        self._ort = _import_ort()
        self._errors = _ort_errors(self._ort)
        # raises early (MissingDependency) for --device cuda without onnxruntime-gpu
        self.providers = select_providers(self.device, self._ort.get_available_providers())

    def session_options(self, static_dims: Mapping[str, int] | None = None) -> Any:
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(self.options.threads or 0)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: ORT's warnings are not for end users
        for name, value in (static_dims or {}).items():
            so.add_free_dimension_override_by_name(str(name), int(value))
        return so

    def load(self, component: str, model_file: Path, inputs: Sequence[TensorSpec],
             outputs: Sequence[TensorSpec], *, static_dims: Mapping[str, int] | None,
             cache_key: str) -> OnnxRuntimeSession:
        ort = self._ort
        model_file = Path(model_file)
        if model_file.suffix.lower() != ".onnx":
            raise ModelError(f"{component}: the onnxruntime backend reads .onnx files, got {model_file.name}",
                             hint="OpenVINO IR (.xml) needs --backend openvino")
        if not model_file.is_file():
            raise ModelError(f"{component}: model file {model_file} is missing")
        check_external_data(model_file)  # before ORT opens anything the file points at
        static_dims = dict(static_dims) if static_dims else None

        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(str(model_file), sess_options=self.session_options(static_dims),
                                        providers=list(self.providers))
        except self._errors as e:
            raise BackendError(f"{component}: onnxruntime cannot load {model_file.name}: {e}") from None
        compile_s = time.perf_counter() - t0
        used = list(sess.get_providers())
        fallback = cuda_fallback_message(self.providers, used)
        if fallback and self.device == "cuda":
            raise BackendError(f"{component}: {fallback}",
                               hint="check the CUDA/cuDNN versions onnxruntime-gpu needs, or use --device cpu")

        model_in = sess.get_inputs()
        _check_names(component, "inputs", inputs, [i.name for i in model_in])
        _check_names(component, "outputs", outputs, [o.name for o in sess.get_outputs()])
        by_name = {i.name: i for i in model_in}
        float_types = set()
        for s in inputs:
            mi = by_name[s.name]
            want = _ORT_TYPES.get(mi.type)
            if want is not None and np.dtype(want) != np.dtype(s.dtype):
                raise BackendError(f"{component}.{s.name}: the model takes {np.dtype(want)}, the manifest says "
                                   f"{s.dtype}", hint="re-export the model with `cpuflow export`")
            if mi.type in ("tensor(float)", "tensor(float16)"):
                float_types.add(mi.type)
            shape = list(mi.shape)
            if len(shape) != len(s.shape):
                raise BackendError(f"{component}.{s.name}: the model's input has rank {len(shape)} {shape}, "
                                   f"the manifest says {list(s.shape)}")
            for i, (want_d, have_d) in enumerate(zip(s.shape, shape)):
                if isinstance(want_d, str):
                    want_d = (static_dims or {}).get(want_d, want_d)
                if isinstance(want_d, int) and isinstance(have_d, int) and have_d > 0 and want_d != have_d:
                    raise BackendError(f"{component}.{s.name}: dimension {i} is {have_d} in the model, "
                                       f"{want_d} expected (manifest {list(s.shape)}, model {shape})")
        precision = "f16" if float_types == {"tensor(float16)"} else "f32"
        info = SessionInfo(backend=self.name, device=used[0] if used else CPU_PROVIDER, precision=precision,
                           compile_s=compile_s, cached=False)
        return OnnxRuntimeSession(component, sess, inputs, outputs, static_dims, info, self._errors)
