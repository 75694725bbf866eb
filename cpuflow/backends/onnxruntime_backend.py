"""The ONNX Runtime backend: ``.onnx`` files on the CPU, or on NVIDIA GPUs with
``onnxruntime-gpu`` (``CUDAExecutionProvider``).

Session options: ``intra_op_num_threads`` = ``options.threads`` (0 = ORT's
default, one per physical core), ``inter_op_num_threads`` = 1, sequential
execution, ``ORT_ENABLE_ALL`` graph optimisations, ORT's default memory arena
(off with ``--low-memory``) and memory-pattern planning. With ``static_dims`` each symbolic input
dimension of that name is pinned with ``add_free_dimension_override_by_name``
(the exporter names ONNX dims like the manifest), which lets ORT plan memory
for fixed shapes; the feeds are checked against the same values.

ORT has no bf16 inference hint on the CPU (use the openvino backend for bf16).

**Optimised-graph cache** (CPU only, when ``options.cache_dir`` is set): ORT
rewrites a graph at every session start (constant folding, fusions, the
blocked NCHWc layout for convolutions), which takes seconds on a UNet. The
first start saves the rewritten graph (ORT's "offline mode":
``optimized_model_filepath``, weights in an external ``.data`` file so UNets
over 2 GB fit protobuf) into a per-model cache subfolder keyed like
OpenVINO's blobs (weights, static dims, ORT version, CPU); later starts load
that graph with optimisations off (``ORT_DISABLE_ALL``), as ORT's docs
prescribe for offline-optimised models. The saved files carry sha256 records
(:mod:`cpuflow.backends.blob_digests`): a damaged one is deleted and the graph
optimised again. Not for CUDA: ORT ties the saved graph to the execution
provider and hardware it was optimised for, and the GPU start is not the
slow part.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import BackendError, InvalidArgument, MissingDependency, ModelError
from ..file_digests import DigestMemo
from ..manifest import TensorSpec
from . import blob_digests
from . import cache as cache_mod
from .base import BackendOptions, SessionInfo, check_feeds
from .device import CPU_PROVIDER, cuda_fallback_message, normalize_device, select_providers
from .onnx_external import check_external_data, external_data_locations

PRECISIONS = ("auto", "f32")

# The saved optimised graph, in a subfolder of the model's cache folder that is
# renamed into place whole (graph and weights together, never one without the other).
OPTIMIZED_DIR = "optimized"
OPTIMIZED_MODEL = "model.onnx"
OPTIMIZED_DATA = "model.data"

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


_PRELOADED: set[int] = set()


def preload_cuda_libraries(ort: Any) -> bool:
    """Load the CUDA / cuDNN libraries of the ``nvidia-*`` pip packages once, before
    the first CUDA session (``onnxruntime.preload_dlls``, ORT >= 1.21).

    ``pip install onnxruntime-gpu[cuda,cudnn]`` puts those libraries in site-packages,
    where the dynamic loader does not look: without this, ORT cannot start its CUDA
    provider unless the user set LD_LIBRARY_PATH or imported torch first, and falls back
    to the CPU. Anything ORT prints goes to stderr (stdout may be a --json stream).
    Returns whether the call was made; a failure is left to the fallback check of
    :meth:`OnnxRuntimeBackend.load`, which names the cause."""
    fn = getattr(ort, "preload_dlls", None)
    if fn is None or id(ort) in _PRELOADED:
        return False
    _PRELOADED.add(id(ort))
    import contextlib
    import sys
    try:
        with contextlib.redirect_stdout(sys.stderr):
            fn()
    except Exception:   # noqa: BLE001 - a missing library shows up as the CUDA fallback, with its hint
        pass
    return True


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


def _weights_bytes(model_file: Path) -> int:
    """Bytes of an ONNX model with its external weights (what a saved graph needs on disk)."""
    total = model_file.stat().st_size
    for loc in set(external_data_locations(model_file)):
        try:
            total += (model_file.parent / loc).stat().st_size
        except OSError:
            pass
    return total


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
        if self.uses_gpu:
            preload_cuda_libraries(self._ort)

    @property
    def uses_gpu(self) -> bool:
        """Whether sessions run on a GPU provider first (CUDA), the CPU only behind it."""
        return self.providers[0] != CPU_PROVIDER

    def session_options(self, static_dims: Mapping[str, int] | None = None, *,
                        optimize: bool = True, save_to: Path | None = None) -> Any:
        """ORT's options; ``optimize=False`` for a graph that was optimised
        already (the cache), ``save_to`` to write the optimised graph there."""
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(self.options.threads or 0)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 3  # errors only: ORT's warnings are not for end users
        # --low-memory: no CPU arena. The arena keeps the most any call took and reuses it; without
        # it each call's buffers go back as it ends (the SD 1.5 UNet at 512x512: 8.1 GB after two
        # calls with the arena, 6.5 GB without; outputs bit-identical, ~10% slower a call).
        so.enable_cpu_mem_arena = bool(self.options.cpu_arena)
        for name, value in (static_dims or {}).items():
            so.add_free_dimension_override_by_name(str(name), int(value))
        if save_to is not None:
            so.optimized_model_filepath = str(save_to / OPTIMIZED_MODEL)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        OPTIMIZED_DATA)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        "1024")
        return so

    def _cache_sub(self, component: str, model_file: Path, cache_key: str,
                   static_dims: Mapping[str, int] | None) -> Path | None:
        """The optimised-graph cache folder of this model and shape (None: no cache)."""
        if self.options.cache_dir is None or self.providers[0] != CPU_PROVIDER:
            return None
        try:
            return cache_mod.model_cache_dir(
                self.options.cache_dir, cache_key, static_dims=static_dims, precision="f32",
                runtime_version=self._ort.__version__, backend=self.name, device=CPU_PROVIDER,
                extra={"component": component, "file": model_file.name, "level": "all",
                       "cpu": cache_mod.cpu_identity()})
        except (InvalidArgument, OSError):
            return None   # an unusable cache folder never fails a load: ORT optimises in memory

    def _create(self, component: str, model_file: Path, so: Any) -> Any:
        try:
            return self._ort.InferenceSession(str(model_file), sess_options=so, providers=list(self.providers))
        except self._errors as e:
            raise BackendError(f"{component}: onnxruntime cannot load {model_file.name}: {e}") from None

    def _open(self, component: str, model_file: Path, cache_key: str,
              static_dims: Mapping[str, int] | None) -> tuple[Any, bool, list[str]]:
        """(the ORT session, whether its graph came from the cache, warnings)."""
        sub = self._cache_sub(component, model_file, cache_key, static_dims)
        if sub is None:
            return self._create(component, model_file, self.session_options(static_dims)), False, []
        notes: list[str] = []
        memo = DigestMemo.in_cache(self.options.cache_dir)
        saved = sub / OPTIMIZED_DIR
        note = blob_digests.check(saved, memo, component)   # damaged files are deleted, never loaded
        if note:
            notes.append(note)
        if (saved / OPTIMIZED_MODEL).is_file() and (saved / blob_digests.RECORD).is_file():
            try:
                check_external_data(saved / OPTIMIZED_MODEL)
                sess = self._create(component, saved / OPTIMIZED_MODEL,
                                    self.session_options(static_dims, optimize=False))
                cache_mod.touch(sub)
                return sess, True, notes
            except (BackendError, ModelError) as e:
                shutil.rmtree(saved, ignore_errors=True)
                notes.append(f"{component}: the saved optimised graph could not be loaded ({e}); "
                             "it was deleted and the graph optimised again")
        shutil.rmtree(saved, ignore_errors=True)   # half a folder (no record): not trusted
        need = _weights_bytes(model_file)
        fits, free = cache_mod.room_for_blob(self.options.cache_dir, need)
        if not fits:
            notes.append(f"{component}: optimised without saving the graph (it needs up to "
                         f"{need / 1024 ** 3:.1f} GiB and only {free / 1024 ** 3:.1f} GiB are free in "
                         f"{self.options.cache_dir}); the next start optimises again. Free some space or "
                         "set CPUFLOW_CACHE_DIR to a bigger disk; --no-cache silences this")
            return self._create(component, model_file, self.session_options(static_dims)), False, notes
        # Written into a private folder, then renamed into place whole: a reader
        # never sees a graph without its weights, and of two processes saving at
        # once, the first rename wins and the other's copy is dropped.
        tmp = sub / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(mode=0o700)
            sess = self._create(component, model_file, self.session_options(static_dims, save_to=tmp))
            try:
                os.rename(tmp, saved)
            except OSError:
                pass   # another process saved it first
            else:
                blob_digests.record(saved, memo)
                try:
                    cache_mod.prune(self.options.cache_dir, cache_mod.DEFAULT_MAX_BYTES, keep=[sub])
                except OSError:
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return sess, False, notes

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
        sess, cached, notes = self._open(component, model_file, cache_key, static_dims)
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
                           compile_s=compile_s, cached=cached, warning="; ".join(notes) or None)
        return OnnxRuntimeSession(component, sess, inputs, outputs, static_dims, info, self._errors)
