"""The OpenVINO backend: CPU inference from an OpenVINO IR (``.xml``) or ``.onnx``.

Load = read_model -> (reshape to static shapes) -> compile_model("CPU") with

* ``INFERENCE_PRECISION_HINT`` from ``options.precision`` (``f32``/``bf16``;
  ``auto`` leaves OpenVINO's default, which is bf16 on CPUs with AMX or
  AVX512-BF16 and f32 elsewhere),
* ``INFERENCE_NUM_THREADS`` = ``options.threads`` when set,
* ``PERFORMANCE_HINT`` = ``LATENCY`` (one stream: one image at a time, all cores),
* ``CACHE_DIR`` = a per-model subfolder of ``options.cache_dir`` (see
  :mod:`cpuflow.backends.cache`), so a second start loads the compiled blob;
  every blob's sha256 is recorded when written and checked before it is
  imported (:mod:`cpuflow.backends.blob_digests`).

A warm start skips the IR altogether: the cache folder's one digest-checked
blob is imported in place (:meth:`OpenVINOBackend._import_cached`), since
OpenVINO's own lookup reads and hashes every weight before it imports (1.45 GB
more peak memory for SD 1.5 int8 with ``--low-memory``, bench/README.md).

Whether the compiled model came from the cache is read back from the compiled
model's ``LOADED_FROM_CACHE`` property (OpenVINO sets it when it imported the
blob instead of compiling). Should a runtime not support that property, we
fall back to comparing the subfolder's ``*.blob`` files before and after:
loaded from cache = a blob was there before and none was written or changed.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import BackendError, InvalidArgument, MissingDependency, ModelError
from ..manifest import TensorSpec
from ..file_digests import DigestMemo
from ..mapped_pages import dropping_mapped_pages
from . import blob_digests
from . import cache as cache_mod
from .base import BackendOptions, SessionInfo, check_feeds
from .device import openvino_device
from .onnx_external import check_external_data
from .precision_fallback import compile_with_fallback

PRECISIONS = ("auto", "f32", "bf16")
_SUFFIXES = (".xml", ".onnx")


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as e:  # pragma: no cover - openvino is a runtime dependency
        raise MissingDependency(f"the openvino backend needs the openvino package ({e})",
                                hint="pip install openvino") from None
    return ov


def _type_name(t: Any) -> str:
    """'f32' / 'bf16' / 'f16' from an openvino Type (or whatever the property returned)."""
    for attr in ("get_type_name", "to_string"):
        fn = getattr(t, attr, None)
        if callable(fn):
            try:
                return str(fn())
            except Exception:  # noqa: BLE001 - fall through to str()
                pass
    return str(t).lower()


def _weights_bytes(model_file: Path) -> int:
    """Bytes of the weights beside an OpenVINO .xml (its .bin) or an ONNX file (its .onnx_data, or itself)."""
    for f in (model_file.with_suffix(".bin"), model_file.with_name(model_file.name + "_data"), model_file):
        if f.is_file():
            return f.stat().st_size
    return 0


def _blob_state(folder: Path | None) -> dict[str, tuple[int, float]]:
    if folder is None:
        return {}
    out = {}
    try:
        for e in os.scandir(folder):
            if e.name.endswith(".blob") and e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                out[e.name] = (st.st_size, st.st_mtime)
    except OSError:
        pass
    return out


def _port_names(port: Any) -> set[str]:
    try:
        return set(port.get_names())
    except Exception:  # noqa: BLE001
        return set()


def _match_ports(component: str, kind: str, specs: Sequence[TensorSpec], ports: Sequence[Any]) -> list[int]:
    """Index of the model port carrying each spec's name; BackendError naming
    both lists when the manifest and the model disagree."""
    names = [_port_names(p) for p in ports]
    shown = [sorted(n)[0] if len(n) == 1 else (sorted(n) if n else "<unnamed>") for n in names]
    index = []
    for s in specs:
        hits = [i for i, n in enumerate(names) if s.name in n]
        if len(hits) != 1:
            break
        index.append(hits[0])
    if len(index) != len(specs) or len(set(index)) != len(index) or len(ports) != len(specs):
        raise BackendError(f"{component}: the model's {kind} {shown} do not match the manifest's "
                           f"{[s.name for s in specs]}",
                           hint="the model file and cpuflow.json come from different exports; re-export")
    return index


_SHORT_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def cache_write_collided(error: Exception, cache_sub: Path | None) -> bool:
    """Whether a failed compile is OpenVINO failing on a file of this cache folder (seen in CI:
    "filesystem error: cannot set permissions: No such file or directory [<cache>/<n>.blob]" with
    two Ray workers compiling the same model into one node cache)."""
    text = str(error)
    return cache_sub is not None and "filesystem error" in text and str(cache_sub) in text


def _compiled_precision(compiled: Any, fallback: str) -> str:
    """What a compiled model computes in ("f32" / "bf16" / "f16"), from its
    INFERENCE_PRECISION_HINT; ``fallback`` when the runtime does not say."""
    try:
        name = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except RuntimeError:
        name = fallback
    return _SHORT_PRECISION.get(name, name)


def cached_blob_payload(blob: Path, ov_version: str) -> int | None:
    """Where the compiled model starts in an OpenVINO cache file (``CACHE_DIR``'s ``*.blob``),
    or None when the file is not one this OpenVINO wrote with no padding.

    Such a file is an XML header line (``<compiled_blob ie_version=... header_size_alignment="0"/>``)
    and a newline, then what ``CompiledModel.export_model`` writes, which ``Core.import_model``
    reads. The version must be this runtime's (the cache folder's key holds it too)."""
    try:
        with open(blob, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    start = head.find(b"<compiled_blob ")
    end = head.find(b"/>", start)
    if start < 0 or end < 0 or head[end + 2:end + 3] != b"\n":
        return None
    tag = head[start:end].decode("utf-8", "replace")
    if f'ie_version="{ov_version}"' not in tag or 'header_size_alignment="0"' not in tag:
        return None
    return end + 3


class OpenVINOSession:
    def __init__(self, component: str, compiled: Any, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], in_index: list[int], out_index: list[int],
                 static_dims: Mapping[str, int] | None, info: SessionInfo, cache_dir: Path | None):
        self.component = component
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.info = info
        self.cache_dir = cache_dir
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._in_index = in_index
        self._out_ports = [compiled.outputs[i] for i in out_index]
        self._dims = dict(static_dims) if static_dims else None
        self._lock = threading.Lock()
        self._blob: Any = None   # the mapped cache blob a session imported in place, kept while it runs
        # --low-memory: the mapped weight files whose pages are dropped while the first call packs
        # the weights into the plugin's own memory (cpuflow/mapped_pages.py); None: not asked
        self.page_out_paths: list[Path] | None = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.component, self.inputs, feeds, self._dims)
        if self._request is None:
            raise BackendError(f"{self.component}: session is closed")
        data = {idx: feeds[s.name] for s, idx in zip(self.inputs, self._in_index)}
        with self._lock, dropping_mapped_pages(self.page_out_paths or []):
            self.page_out_paths = None   # the first call only: later calls read what they need
            try:
                # share_inputs: the request reads the caller's arrays in place (the call is
                # synchronous, so they cannot change underneath it); outputs are copied
                # (share_outputs=False) because the next run overwrites the request's tensors.
                res = self._request.infer(data, share_inputs=True, share_outputs=False)
            except RuntimeError as e:
                raise BackendError(f"{self.component}: openvino inference failed: {e}") from None
            return {s.name: res[p] for s, p in zip(self.outputs, self._out_ports)}

    def get_property(self, name: str) -> Any:
        """A property of the compiled model (e.g. ``INFERENCE_NUM_THREADS``)."""
        return self._compiled.get_property(name)

    def close(self) -> None:
        self._request = None
        self._compiled = None
        self._blob = None

    def __enter__(self) -> "OpenVINOSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OpenVINOBackend:
    name = "openvino"
    uses_gpu = False   # OpenVINO serves the CPU only here (backends/device.py)

    def __init__(self, options: BackendOptions | None = None):
        options = options or BackendOptions()
        self.device = openvino_device(options.device)
        if options.precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
        if options.threads is not None and (not isinstance(options.threads, int) or isinstance(options.threads, bool)
                                            or options.threads < 1):
            raise InvalidArgument(f"threads must be a positive integer, got {options.threads!r}")
        self.options = options
        self._ov = _import_openvino()
        self._core = self._ov.Core()

    # ------------------------------------------------------------------
    def _config(self, cache_sub: Path | None, precision: str | None = None) -> dict[str, Any]:
        ov = self._ov
        import openvino.properties as props
        import openvino.properties.hint as hints
        precision = precision or self.options.precision
        cfg: dict[str, Any] = {hints.performance_mode(): hints.PerformanceMode.LATENCY}
        if precision == "f32":
            cfg[hints.inference_precision()] = ov.Type.f32
        elif precision == "bf16":
            cfg[hints.inference_precision()] = ov.Type.bf16
        if self.options.threads is not None:
            cfg[props.inference_num_threads()] = int(self.options.threads)
        if cache_sub is not None:
            cfg[props.cache_dir()] = str(cache_sub)
        return cfg

    def _default_precision_name(self) -> str:
        """What precision "auto" means here ("bf16" / "f32"), for messages."""
        if self.options.precision != "auto":
            return self.options.precision
        try:
            name = _type_name(self._core.get_property(self.device, "INFERENCE_PRECISION_HINT"))
        except Exception:  # noqa: BLE001 - only a message depends on it
            return "the CPU's default"
        return _SHORT_PRECISION.get(name, name)

    def _cache_sub(self, component: str, model_file: Path, cache_key: str, static_dims: Mapping[str, int] | None,
                   precision: str) -> Path | None:
        """The compiled-model cache folder of this model, shape and precision setting (None: no cache)."""
        if self.options.cache_dir is None:
            return None
        return cache_mod.model_cache_dir(
            self.options.cache_dir, cache_key, static_dims=static_dims, precision=precision,
            runtime_version=self._ov.get_version(), backend=self.name, device=self.device,
            extra={"component": component, "file": model_file.name, "cpu": cache_mod.cpu_identity()})

    def _reshape(self, component: str, model: Any, inputs: Sequence[TensorSpec], in_index: list[int],
                 static_dims: Mapping[str, int]) -> None:
        ov = self._ov
        shapes = {}
        for s, idx in zip(inputs, in_index):
            port = model.inputs[idx]
            current = port.get_partial_shape()
            if current.rank.is_dynamic or current.rank.get_length() != len(s.shape):
                raise BackendError(f"{component}.{s.name}: the model's input has shape {current}, "
                                   f"the manifest says {list(s.shape)}",
                                   hint="re-export the model with `cpuflow export`")
            dims = []
            for i, want in enumerate(s.shape):
                if isinstance(want, int):
                    dims.append(ov.Dimension(want))
                elif want in static_dims:
                    dims.append(ov.Dimension(int(static_dims[want])))
                else:
                    dims.append(current[i])  # not given: stays as the model has it (usually dynamic)
            shapes[port] = ov.PartialShape(dims)
        try:
            model.reshape(shapes)
        except RuntimeError as e:
            wanted = {s.name: str(shapes[model.inputs[i]]) for s, i in zip(inputs, in_index)}
            raise BackendError(f"{component}: cannot reshape the model to {wanted}: {e}") from None

    def load(self, component: str, model_file: Path, inputs: Sequence[TensorSpec],
             outputs: Sequence[TensorSpec], *, static_dims: Mapping[str, int] | None,
             cache_key: str) -> OpenVINOSession:
        model_file = Path(model_file)
        if model_file.suffix.lower() not in _SUFFIXES:
            raise ModelError(f"{component}: the openvino backend reads .xml (OpenVINO IR) or .onnx files, "
                             f"got {model_file.name}")
        if not model_file.is_file():
            raise ModelError(f"{component}: model file {model_file} is missing")
        if model_file.suffix.lower() == ".onnx":
            check_external_data(model_file)  # before OpenVINO opens anything the file points at
        elif not model_file.with_suffix(".bin").is_file():
            raise ModelError(f"{component}: {model_file.name} has no weights file "
                             f"{model_file.with_suffix('.bin').name} beside it")
        static_dims = dict(static_dims) if static_dims else None

        t0 = time.perf_counter()
        hit, damaged_note = self._import_cached(component, model_file, inputs, outputs, static_dims, cache_key, t0)
        if hit is not None:
            return hit
        try:
            model = self._core.read_model(str(model_file))
        except RuntimeError as e:
            raise BackendError(f"{component}: openvino cannot read {model_file.name}: {e}") from None
        in_index = _match_ports(component, "inputs", inputs, model.inputs)
        _match_ports(component, "outputs", outputs, model.outputs)
        for s, idx in zip(inputs, in_index):
            have = model.inputs[idx].get_element_type().to_dtype()
            if np.dtype(have) != np.dtype(s.dtype):
                raise BackendError(f"{component}.{s.name}: the model takes {np.dtype(have)}, the manifest says "
                                   f"{s.dtype}", hint="re-export the model with `cpuflow export`")
        if static_dims:
            self._reshape(component, model, inputs, in_index, static_dims)

        cache_notes: list[str] = []
        blob_notes: list[str] = [damaged_note] if damaged_note else []
        memo = DigestMemo.in_cache(self.options.cache_dir) if self.options.cache_dir is not None else None

        def cache_sub_of(precision: str) -> Path | None:
            sub = self._cache_sub(component, model_file, cache_key, static_dims, precision)
            if sub is not None:   # a blob that is not the one we wrote is deleted, never imported
                note = blob_digests.check(sub, memo, component)
                if note:
                    blob_notes.append(note)
            if sub is None or _blob_state(sub):
                return sub   # no cache, or a blob to load: nothing new is written
            need = _weights_bytes(model_file)
            fits, free = cache_mod.room_for_blob(self.options.cache_dir, need)
            if fits:
                return sub
            if not cache_notes:
                cache_notes.append(
                    f"{component}: compiled without the cache (its compiled model needs up to "
                    f"{need / 1024 ** 3:.1f} GiB and only {free / 1024 ** 3:.1f} GiB are free in "
                    f"{self.options.cache_dir}); the next start compiles again. Free some space or set "
                    f"CPUFLOW_CACHE_DIR to a bigger disk; --no-cache silences this")
            return None

        def compile_at(precision: str) -> Any:
            sub = cache_sub_of(precision)
            before[precision] = _blob_state(sub)
            try:
                return self._core.compile_model(model, self.device, self._config(sub, precision))
            except RuntimeError as e:
                if not cache_write_collided(e, sub):
                    raise
            # Two processes (batch workers on one node) wrote the same cache entry at once:
            # OpenVINO's blob write is not atomic across processes. Compiling again finds the
            # entry written, or writes it.
            before[precision] = _blob_state(sub)
            return self._core.compile_model(model, self.device, self._config(sub, precision))

        before: dict[str, dict] = {}
        mapped_files = self._mapped_files(model_file)
        with dropping_mapped_pages(mapped_files):
            compiled, used, cache_sub, warning = compile_with_fallback(
                component, model_file.name, self.device, self.options.precision, self._default_precision_name(),
                compile_at, cache_sub_of)
        compile_s = time.perf_counter() - t0
        cached = self._loaded_from_cache(compiled, before[used], _blob_state(cache_sub), cache_sub)
        if cache_sub is not None and not cached:
            blob_digests.record(cache_sub, memo)
        in_index = _match_ports(component, "inputs", inputs, compiled.inputs)
        out_index = _match_ports(component, "outputs", outputs, compiled.outputs)
        precision = _compiled_precision(compiled, used)
        if cache_sub is not None:
            try:
                cache_mod.prune(self.options.cache_dir, cache_mod.DEFAULT_MAX_BYTES, keep=[cache_sub])
            except OSError:
                pass  # a full or read-only cache never fails a load
        warning = "; ".join(w for w in (warning, *blob_notes, *cache_notes) if w) or None
        info = SessionInfo(backend=self.name, device=self.device, precision=precision,
                           compile_s=compile_s, cached=cached, warning=warning)
        session = OpenVINOSession(component, compiled, inputs, outputs, in_index, out_index,
                                  static_dims, info, cache_sub)
        if mapped_files:
            session.page_out_paths = mapped_files + (sorted(cache_sub.glob("*.blob")) if cache_sub else [])
        return session

    def _mapped_files(self, model_file: Path) -> list[Path]:
        """The weight files OpenVINO maps for ``model_file`` when --low-memory asks for their
        pages to be dropped once packed (an IR's .bin), else []."""
        if not self.options.page_out_weights or model_file.suffix.lower() != ".xml":
            return []
        return [model_file.with_suffix(".bin")]

    def _import_cached(self, component: str, model_file: Path, inputs: Sequence[TensorSpec],
                       outputs: Sequence[TensorSpec], static_dims: Mapping[str, int] | None, cache_key: str,
                       t0: float) -> tuple[OpenVINOSession | None, str | None]:
        """A cache hit without reading the model: (the compiled blob imported in place, or None;
        the warning when a damaged blob was deleted).

        OpenVINO's own lookup (``compile_model(model, CACHE_DIR)``) needs the IR read, reshaped
        and hashed first, which pages every weight in while the blob is imported: the full
        SD 1.5 int8 model peaked at 2.86 GB on a warm start against 2.06 GB compiling with no
        cache (bench/README.md, "SD 1.5 int8 generation in 2.5 GB"). The cache folder's key
        already names the weights, shapes, precision, OpenVINO version and CPU, so its one
        digest-checked blob is imported directly, from a copy-on-write map of the file
        (``shared_memory``: no copy of the blob in memory). Anything unexpected (no blob, two,
        an unknown header, an import error) returns None and the usual path runs."""
        if self.options.cache_dir is None:
            return None, None
        note = None
        try:
            sub = self._cache_sub(component, model_file, cache_key, static_dims, self.options.precision)
            if not sub.is_dir():
                return None, None
            memo = DigestMemo.in_cache(self.options.cache_dir)
            note = blob_digests.check(sub, memo, component)   # damaged / unrecorded blobs are deleted
            blobs = sorted(sub.glob("*.blob"))
            if note or len(blobs) != 1:
                return None, note
            offset = cached_blob_payload(blobs[0], self._ov.get_version())
            if offset is None:
                return None, None
            mapped = np.memmap(blobs[0], dtype=np.uint8, mode="c", offset=offset)
            with dropping_mapped_pages(blobs if self.options.page_out_weights else []):
                compiled = self._core.import_model(self._ov.Tensor(mapped, shared_memory=True), self.device,
                                                   self._config(None))
            in_index = _match_ports(component, "inputs", inputs, compiled.inputs)
            out_index = _match_ports(component, "outputs", outputs, compiled.outputs)
            for s_, idx in zip(inputs, in_index):
                if np.dtype(compiled.inputs[idx].get_element_type().to_dtype()) != np.dtype(s_.dtype):
                    return None, None
            precision = _compiled_precision(compiled, self.options.precision)
        except Exception:   # noqa: BLE001 - the usual path runs and reports real problems
            return None, note
        try:
            cache_mod.touch(sub)
        except OSError:
            pass
        info = SessionInfo(backend=self.name, device=self.device, precision=precision,
                           compile_s=time.perf_counter() - t0, cached=True, warning=None)
        session = OpenVINOSession(component, compiled, inputs, outputs, in_index, out_index, static_dims, info, sub)
        session._blob = mapped
        if self.options.page_out_weights:
            session.page_out_paths = list(blobs)
        return session, None

    @staticmethod
    def _loaded_from_cache(compiled: Any, before: dict, after: dict, cache_sub: Path | None) -> bool:
        if cache_sub is None:
            return False
        try:
            return bool(compiled.get_property("LOADED_FROM_CACHE"))
        except RuntimeError:
            return bool(before) and before == after
