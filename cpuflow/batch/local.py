"""Running jobs on this machine: in this process (one worker), or in N worker
processes that each hold the model and split the cores (``--workers N``).

An executor takes jobs and yields :class:`~cpuflow.batch.worker.Outcome` s as
they finish, in any order; the driver (:mod:`cpuflow.batch.runner`) writes them.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import signal
from typing import Iterator

from ..errors import CpuflowError
from .worker import Outcome, load_pipeline, run_job


class InProcess:
    """One model in this process: the simplest and, on a few cores, as fast as more
    workers (see bench/README.md, "Many images")."""

    def __init__(self, load_options: dict, on_event=None):
        self.pipe = load_pipeline(load_options)
        self.workers = 1
        if on_event:
            on_event({"event": "worker", "worker": "local", "pid": None})

    def run(self, jobs) -> Iterator[Outcome]:
        for job in jobs:
            yield run_job(self.pipe, job.id, job.request)

    def close(self) -> None:
        self.pipe.close()


_PIPE = None


def _init_worker(load_options: dict) -> None:
    global _PIPE
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the driver's: it stops us cleanly
    _PIPE = load_pipeline(load_options)


def _run_in_worker(job_id, request) -> Outcome:
    return run_job(_PIPE, job_id, request)


class ProcessPool:
    """N worker processes (spawned: no forked OpenVINO state), each with its own copy
    of the model and ``threads`` cores; at most two jobs in flight per worker."""

    def __init__(self, load_options: dict, workers: int, on_event=None):
        self.workers = workers
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(load_options,))

    def run(self, jobs) -> Iterator[Outcome]:
        it = iter(jobs)
        inflight: dict[cf.Future, object] = {}

        def fill():
            while len(inflight) < 2 * self.workers:
                job = next(it, None)
                if job is None:
                    return
                inflight[self.pool.submit(_run_in_worker, job.id, job.request)] = job

        fill()
        while inflight:
            done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                inflight.pop(fut)
                try:
                    yield fut.result()
                except cf.process.BrokenProcessPool:
                    raise CpuflowError("a local worker process died (out of memory?); finished images are kept",
                                       hint="rerun the same command to finish the rest") from None
            fill()

    def close(self) -> None:
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:      # a worker busy with a cancelled job: do not wait for it
            if p.is_alive():
                p.kill()
