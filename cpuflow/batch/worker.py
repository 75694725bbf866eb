"""What a worker does, wherever it runs (this process, a local worker process,
a Ray actor): hold one loaded model and turn a job's request into pixels and
the record of what made them. Files are the driver's business, never a worker's.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CpuflowError


@dataclass
class Outcome:
    """A finished job, as the driver receives it."""
    job_id: str
    pixels: np.ndarray | None = None        # HxWx3 uint8; None when failed
    record: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    worker: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def load_pipeline(load_options: dict):
    from ..api import Pipeline
    return Pipeline.load(**load_options)


def run_job(pipe, job_id: str, request) -> Outcome:
    """One image. Bad input and numerical faults become a failed outcome (the
    batch goes on); anything else a worker cannot survive propagates."""
    made: list = []
    try:
        # the pipeline's per-image callback: the image and its record as it is made
        # (before the per-run timings are added: they stay out of the PNG, so reruns are byte-equal)
        result = pipe(request, on_image=lambda image, record: made.append((image, dict(record))))
    except CpuflowError as e:
        return Outcome(job_id, error=str(e), worker=worker_name())
    except (ValueError, TypeError, ArithmeticError) as e:   # a bug met by this input: fail the job, go on
        return Outcome(job_id, error=f"{type(e).__name__}: {e}", worker=worker_name())
    (image, record), = made       # a batch job is one image
    record.pop("timings", None)
    return Outcome(job_id, pixels=np.asarray(image), record=record, seconds=result.timings.get("total"),
                   worker=worker_name(), warnings=list(result.warnings))
