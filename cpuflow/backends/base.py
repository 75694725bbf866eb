"""What every backend offers: load a manifest component into a Session and run it.

A backend owns its whole lifecycle (reading the model files, reshaping to
static shapes, compiling, caching, inference). No backend imports another.
Feeds are checked against the manifest's specs here, at the boundary, by name,
with errors that name the input, the expected and the actual value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np

from ..errors import BackendError, InvalidArgument
from ..manifest import TensorSpec


@dataclass(frozen=True)
class BackendOptions:
    """How a backend should run: everything here is validated by config.LoadConfig."""

    device: str = "auto"        # auto | cpu | cuda
    precision: str = "auto"     # auto | bf16 | f32   (OpenVINO inference precision hint)
    threads: int | None = None  # None: the backend's default (all physical cores)
    cache_dir: Path | None = None  # compiled-model cache (OpenVINO); None disables it
    page_out_weights: bool = False  # --low-memory: drop mapped weight pages once packed (OpenVINO)
    cpu_arena: bool = True      # ONNX Runtime's CPU memory arena; --low-memory turns it off


@dataclass(frozen=True)
class SessionInfo:
    backend: str     # "openvino" | "onnxruntime"
    device: str      # what actually runs it, e.g. "CPU", "CUDAExecutionProvider"
    precision: str   # what it computes in, e.g. "f32", "bf16"
    compile_s: float  # load + compile seconds
    cached: bool     # compiled model came from the cache
    warning: str | None = None  # something the user should know (e.g. compiled in f32 after bf16 failed)


class Session(Protocol):
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    info: SessionInfo

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def close(self) -> None:
        ...


def check_feeds(component: str, specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray],
                dims: Mapping[str, int] | None = None) -> None:
    """Feeds must match the manifest's input specs by name, dtype and rank (and
    every fixed dimension, and symbolic ones given in ``dims``)."""
    expected = {s.name for s in specs}
    got = set(feeds)
    if expected != got:
        missing = sorted(expected - got)
        extra = sorted(got - expected)
        raise BackendError(f"{component}: inputs do not match the manifest "
                           f"(missing {missing}, unexpected {extra})")
    for s in specs:
        a = feeds[s.name]
        if not isinstance(a, np.ndarray):
            raise BackendError(f"{component}.{s.name}: expected a numpy array, got {type(a).__name__}")
        if a.dtype != np.dtype(s.dtype):
            raise BackendError(f"{component}.{s.name}: expected dtype {s.dtype}, got {a.dtype}")
        if a.ndim != len(s.shape):
            raise BackendError(f"{component}.{s.name}: expected rank {len(s.shape)} {list(s.shape)}, "
                               f"got shape {list(a.shape)}")
        for i, (want, have) in enumerate(zip(s.shape, a.shape)):
            if isinstance(want, str) and dims is not None and want in dims:
                want = dims[want]
            if isinstance(want, int) and want != have:
                raise BackendError(f"{component}.{s.name}: dimension {i} must be {want}, got {have} "
                                   f"(shape {list(a.shape)})")


class Backend(Protocol):
    name: str
    uses_gpu: bool   # sessions run on a GPU first (the default variant is then fp32: cpuflow/variants.py)

    def load(self, component: str, model_file: Path, inputs: Sequence[TensorSpec],
             outputs: Sequence[TensorSpec], *, static_dims: Mapping[str, int] | None,
             cache_key: str) -> Session:
        """Load ``model_file`` (``.onnx`` or ``.xml``) and return a ready Session.
        ``static_dims`` gives values for the symbolic dims (batch, sizes) to
        compile static shapes for; None keeps them dynamic. ``cache_key``
        identifies the weights (model hash + variant) for compiled-model caches."""
        ...


BACKENDS = ("openvino", "onnxruntime")


def get_backend(name: str, options: BackendOptions) -> Backend:
    if name == "openvino":
        from .openvino_backend import OpenVINOBackend
        return OpenVINOBackend(options)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(options)
    raise InvalidArgument(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
