"""The batch driver: jobs in, images out, exactly once.

It resolves every job against the model's defaults (:mod:`.jobs`), skips what
the journal says is finished (:mod:`.journal`), hands the rest to an executor
(this process, local worker processes, or Ray actors), and writes each outcome
as it arrives. Only the driver writes files, so the same journal makes every
mode resumable. Ctrl-C stops after the image being written (none is half
written) and returns a summary marked ``interrupted``; a rerun finishes the rest.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

from ..config import LoadConfig
from ..errors import InvalidArgument
from . import jobs as jobs_mod
from .journal import OutputDir

Event = Callable[[dict], None]


@dataclass
class Summary:
    out: Path
    total: int                 # distinct jobs in this command
    done_before: int           # finished by earlier runs (skipped)
    written: int = 0           # images written by this run
    adopted: int = 0           # images a killed run wrote but did not journal: journalled now
    failed: int = 0            # jobs that failed in this run
    failed_before: int = 0     # failed in earlier runs, not retried (--retry-failed retries them)
    duplicates: int = 0        # jobs given more than once (made once)
    seconds: float = 0.0
    workers: int = 0
    interrupted: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)    # (source, error), first 50

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return not self.interrupted and self.done_before + self.written + self.adopted + self.failed \
            + self.failed_before == self.total

    def line(self) -> str:
        parts = [f"{self.written} image(s) written in {self.seconds:.1f} s ({self.images_per_minute:.1f}/min, "
                 f"{self.workers} worker(s))"]
        if self.done_before:
            parts.append(f"{self.done_before} already done")
        if self.adopted:
            parts.append(f"{self.adopted} recovered from an interrupted run")
        if self.failed or self.failed_before:
            parts.append(f"{self.failed + self.failed_before} failed (see {self.out / 'results.jsonl'})")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate job(s) made once")
        left = self.total - self.done_before - self.written - self.adopted - self.failed - self.failed_before
        parts.append(f"{left} left of {self.total}" if left else f"all {self.total} job(s) finished")
        return ("stopped: " if self.interrupted else "") + "; ".join(parts)


def run(jobs: str | os.PathLike | Iterable[dict] | None = None, *, out: str | os.PathLike,
        model: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None,
        seeds: str | list[int] | None = None, params: dict | None = None,
        ray: str | None = None, workers: int | str | None = None, cpus_per_worker: int = 1,
        model_transfer: str = "auto", model_uri: str | None = None, retry_failed: bool = False,
        backend: str = "openvino", device: str = "auto", precision: str = "auto", variant: str | None = None,
        threads: int | None = None, use_cache: bool = True, progress: Event | None = None) -> Summary:
    """Make every image a batch asks for, in ``out``; skip what an earlier run finished.

    ``jobs``: a JSONL file (one ``POST /api/generate`` JSON object a line, plus
    ``init_image_path``) or an iterable of such dicts; or ``prompts``: a text file,
    one prompt a line, the other fields from ``params``. ``seeds``: ``"A..B"`` or a
    list: each job without its own seed is made once per seed. ``ray``: ``"auto"``
    or ``"ray://HOST:PORT"`` (or an already initialised Ray: any value) to run on a
    Ray cluster with ``workers`` actors of ``cpus_per_worker`` CPUs each (None: the
    cluster's CPUs / ``cpus_per_worker``). Locally ``workers`` is the number of worker
    processes (None: 1, in this process); ``"auto"`` (the CLI's default) takes the count
    ``cpuflow bench --throughput`` measured fastest for this model on this CPU, else 1,
    and says which and why in a ``note`` event;
    ``model_transfer``: ``auto`` (a shared path when the nodes see it, else
    shipped), ``shared`` or ``ship``; ``model_uri``: workers fetch a tar archive of
    the model folder from there instead (file://, http(s)://). ``progress(event)`` gets dicts with an
    ``"event"`` key: note, start, worker, image, failed, requeued, warning.
    """
    emit = progress or (lambda ev: None)
    if (jobs is None) == (prompts is None):
        raise InvalidArgument("give a jobs file (JSONL) or --prompts, not both or neither")
    if model_transfer not in ("auto", "shared", "ship"):
        raise InvalidArgument(f"model_transfer must be auto, shared or ship, got {model_transfer!r}")
    if model_uri is not None and ray is None:
        raise InvalidArgument("--model-uri is for --ray workers; locally, pass the folder as --model")
    if workers == "auto" and ray is not None:
        workers = None               # on Ray: the cluster's CPUs / cpus_per_worker
    if workers not in (None, "auto") and not (isinstance(workers, int) and 1 <= workers <= 4096):
        raise InvalidArgument(f"workers must be auto or a whole number between 1 and 4096, got {workers!r}")
    if not 1 <= int(cpus_per_worker) <= 1024:
        raise InvalidArgument(f"cpus_per_worker must be between 1 and 1024, got {cpus_per_worker}")
    seed_list = jobs_mod.parse_seeds(seeds) if isinstance(seeds, (str, type(None))) else list(seeds)
    cfg = LoadConfig(model=model, backend=backend, device=device, precision=precision, threads=threads,
                     variant=variant, use_cache=use_cache)
    load_options = {"model": cfg.model, "backend": backend, "device": device, "precision": precision,
                    "threads": threads, "variant": variant, "use_cache": use_cache}

    from ..pipelines.model import LoadedModel
    facts = LoadedModel(cfg)           # manifest, tokenizer, defaults: no session is compiled
    try:
        from ..server.request import describe
        info = describe("batch", SimpleNamespace(model=facts))
        model_dir = facts.manifest.root
        run_config = {"model_hash": info["model_hash"], "backend": backend, "device": device,
                      "precision": facts.options.precision, "variant": variant}
    finally:
        facts.close()
    load_options["model"] = model_dir
    if workers == "auto":
        from ..bench.throughput import choose_workers
        workers, why = choose_workers(info["model_hash"], backend=backend, precision=precision, variant=variant,
                                      model=model)
        emit({"event": "note", "message": why, "workers": workers})

    if prompts is not None:
        bodies = jobs_mod.read_prompts(Path(prompts), dict(params or {}))
        base_dir = Path(prompts).resolve().parent
    elif isinstance(jobs, (str, os.PathLike)):
        bodies = jobs_mod.read_jsonl(Path(jobs))
        base_dir = Path(jobs).resolve().parent
    else:
        bodies = ((f"job {i + 1}", obj) for i, obj in enumerate(jobs))
        base_dir = Path.cwd()
    all_jobs = jobs_mod.make_jobs(bodies, info, seeds=seed_list, base_dir=base_dir)
    unique: dict[str, jobs_mod.BatchJob] = {}
    for job in all_jobs:
        unique.setdefault(job.id, job)
    summary = Summary(out=Path(out), total=len(unique), done_before=0, duplicates=len(all_jobs) - len(unique))

    t0 = time.perf_counter()
    executor = None
    with OutputDir.open(out, run_config) as od:
        todo = []
        for job in unique.values():
            if job.id in od.done:
                summary.done_before += 1
            elif od.is_finished(job.id, retry_failed=retry_failed):
                summary.failed_before += 1
            else:
                todo.append(job)
        emit({"event": "start", "total": summary.total, "done_before": summary.done_before,
              "failed_before": summary.failed_before, "todo": len(todo)})
        runnable = []
        try:
            for job in todo:
                if job.request is None:
                    od.write_failed(job, job.error or "bad input")
                    _failed(summary, job, job.error or "bad input", emit)
                elif od.adopt(job):
                    summary.adopted += 1
                    emit({"event": "image", "job": job.id, "file": str(od.image_path(job.id)), "adopted": True})
                else:
                    runnable.append(job)
            if runnable:
                executor = _executor(ray, load_options, model_dir, workers, cpus_per_worker, model_transfer,
                                     model_uri, emit)
                summary.workers = executor.workers
                by_id = {j.id: j for j in runnable}
                t0 = time.perf_counter()     # images per minute: from the first job, after the model loaded
                for outcome in executor.run(runnable):
                    job = by_id[outcome.job_id]
                    for w in outcome.warnings:
                        emit({"event": "warning", "message": w, "job": job.id})
                    if outcome.error is not None:
                        od.write_failed(job, outcome.error, worker=outcome.worker)
                        _failed(summary, job, outcome.error, emit)
                        continue
                    from PIL import Image
                    path = od.write_done(job, Image.fromarray(outcome.pixels), outcome.record,
                                         seconds=outcome.seconds, worker=outcome.worker)
                    summary.written += 1
                    emit({"event": "image", "job": job.id, "file": str(path), "worker": outcome.worker,
                          "seconds": outcome.seconds})
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            summary.seconds = time.perf_counter() - t0
            if executor is not None:
                executor.close()
    return summary


def _failed(summary: Summary, job, error: str, emit: Event) -> None:
    summary.failed += 1
    if len(summary.errors) < 50:
        summary.errors.append((job.source, error))
    emit({"event": "failed", "job": job.id, "source": job.source, "error": error})


def _executor(ray: str | None, load_options: dict, model_dir: Path, workers: int | None, cpus_per_worker: int,
              model_transfer: str, model_uri: str | None, emit: Event):
    if ray is not None:
        from .ray_pool import RayPool
        return RayPool(ray, load_options, model_dir, workers=workers, cpus_per_worker=cpus_per_worker,
                       model_transfer_mode=model_transfer, model_uri=model_uri, on_event=emit)
    from .local import InProcess, ProcessPool
    if workers is None or workers == 1:
        return InProcess(load_options, on_event=emit)
    if load_options.get("threads") is None:
        from ..cpu import default_threads
        load_options = dict(load_options, threads=max(1, default_threads() // workers))
    return ProcessPool(load_options, workers, on_event=emit)
