"""Which device / execution provider a backend runs on.

Pure functions of the user's ``device`` option and what the installed runtime
offers, so they can be unit-tested without any accelerator:

* OpenVINO serves the CPU only (its Intel-GPU device is out of scope).
* ONNX Runtime serves the CPU and, with ``onnxruntime-gpu`` and a CUDA driver,
  NVIDIA GPUs through ``CUDAExecutionProvider``.

TensorRT (``TensorrtExecutionProvider``) is never picked: it builds engines for
minutes on first use and silently changes numerics, so ``auto`` and ``cuda``
both mean the plain CUDA provider with the CPU behind it for unsupported ops.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import InvalidArgument, MissingDependency

DEVICES = ("auto", "cpu", "cuda")

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_CUDA_HINT = "install onnxruntime-gpu and a CUDA driver (pip install onnxruntime-gpu), or use --device cpu"


def normalize_device(device: str) -> str:
    """``device`` lower-cased and checked against :data:`DEVICES`."""
    d = str(device).strip().lower() if device is not None else "auto"
    if d not in DEVICES:
        raise InvalidArgument(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    return d


def openvino_device(device: str) -> str:
    """The OpenVINO device name for a cpuflow ``device`` option: always ``"CPU"``."""
    d = normalize_device(device)
    if d == "cuda":
        raise InvalidArgument(
            "the openvino backend runs on the CPU only; device 'cuda' is served by the onnxruntime backend",
            hint="use --backend onnxruntime --device cuda (needs onnxruntime-gpu), or --device cpu",
        )
    return "CPU"


def select_providers(device: str, available: Sequence[str]) -> list[str]:
    """ONNX Runtime execution providers, in priority order, for ``device``.

    * ``cpu``  -> ``[CPUExecutionProvider]``
    * ``cuda`` -> ``[CUDAExecutionProvider, CPUExecutionProvider]``; raises
      :class:`MissingDependency` when the CUDA provider is not available.
    * ``auto`` -> CUDA first when available, else the CPU alone.

    Other providers in ``available`` (TensorRT, Azure, OpenVINO-EP, ...) are
    ignored on purpose.
    """
    d = normalize_device(device)
    avail = list(available)
    has_cuda = CUDA_PROVIDER in avail
    if d == "cpu":
        return [CPU_PROVIDER]
    if d == "cuda":
        if not has_cuda:
            raise MissingDependency(
                "device 'cuda' needs onnxruntime's CUDAExecutionProvider, which this onnxruntime lacks "
                f"(available: {', '.join(avail) or 'none'})",
                hint=_CUDA_HINT,
            )
        return [CUDA_PROVIDER, CPU_PROVIDER]
    # auto
    if has_cuda:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def cuda_fallback_message(requested: Sequence[str], used: Sequence[str]) -> str | None:
    """A message when ONNX Runtime silently fell back from CUDA to the CPU
    (it does that when the CUDA/cuDNN libraries fail to load), else None."""
    if requested and requested[0] == CUDA_PROVIDER and (not used or used[0] != CUDA_PROVIDER):
        return ("onnxruntime could not start CUDAExecutionProvider (CUDA or cuDNN libraries missing or "
                f"mismatched) and fell back to {', '.join(used) or 'nothing'}")
    return None
