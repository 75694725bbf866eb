"""`cpuflow bench --throughput`: images per minute of `cpuflow batch` on this
machine with 1, 2, 4, ... worker processes (up to the physical cores), and the
record that `cpuflow batch` (``--workers auto``, its default) reads to choose.

Each count is measured by running a real batch (:func:`cpuflow.batch.run`, the
jobs, executor and driver writes a user's batch runs) into a temporary folder;
its rate counts the images after the first ``warmup`` of each worker (those
pay the model load and compile). A worker process holds its own copy of the
model, so more workers buy throughput only where one model cannot keep the
cores busy (small models: a tiny UNet call is too short for two threads to
share) and cost memory; which count wins depends on the CPU and the model, so
it is measured, never assumed.

The record lives in the compiled-model cache folder
(:func:`cpuflow.backends.cache.default_cache_dir`)::

    <cache>/throughput/<model hash>-<hash16 of (CPU, backend, precision, variant)>.json

keyed by the model's cache key (its manifest's weights hash, the key of its
compiled blobs) and by this CPU's description (:func:`cpuflow.cpu.describe`):
a record made on another CPU, for another model or configuration is never used.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidArgument

SCHEMA = "cpuflow-throughput/1"
RECORD_DIR = "throughput"
PROMPTS = ("a red circle on a blue background", "a green square on a white background")


def machine_key() -> str:
    """This CPU as the record knows it: model, cores (physical / logical / usable) and the ISA
    features that change speed (cpuinfo only: the same string in every process). Not the compiled
    cache's ``cache.cpu_identity()``: the best worker count depends on the cores it leaves out."""
    from ..cpu import cpu_features, describe
    return describe(cpu_features(use_openvino=False))


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... below ``cores``, then ``cores`` itself: [1] on one core, [1, 2] on two."""
    counts, k = [1], 2
    while k < cores:
        counts.append(k)
        k *= 2
    if cores > 1:
        counts.append(cores)
    return counts


def record_path(model_hash: str, *, backend: str, precision: str, variant: str | None,
                cpu: str | None = None, cache_root: str | os.PathLike | None = None) -> Path:
    from ..backends.cache import default_cache_dir
    key = json.dumps({"cpu": cpu if cpu is not None else machine_key(), "backend": backend,
                      "precision": precision, "variant": variant}, sort_keys=True)
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else default_cache_dir()
    return root / RECORD_DIR / f"{model_hash}-{h}.json"


def write_record(result: dict[str, Any]) -> Path:
    """Write one configuration's measurement (atomically: a reader sees the old record or the new)."""
    from ..backends.cache import default_cache_dir, ensure_private_dir
    path = record_path(result["model_hash"], backend=result["backend"], precision=result["precision"],
                       variant=result["variant"], cpu=result["cpu"])
    ensure_private_dir(default_cache_dir())
    ensure_private_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_record(model_hash: str, *, backend: str, precision: str, variant: str | None) -> dict | None:
    """The record for this model, configuration and CPU, or None (absent, unreadable, or made for
    something else: its fields must name exactly what is asked)."""
    cpu = machine_key()
    path = record_path(model_hash, backend=backend, precision=precision, variant=variant, cpu=cpu)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    want = {"schema": SCHEMA, "model_hash": model_hash, "cpu": cpu, "backend": backend, "precision": precision,
            "variant": variant}
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in want.items()):
        return None
    rates = rec.get("images_per_minute")
    if not isinstance(rates, dict) or not rates or rec.get("best") not in {int(k) for k in rates}:
        return None
    return rec


def choose_workers(model_hash: str, *, backend: str, precision: str, variant: str | None,
                   model: str | os.PathLike | None = None) -> tuple[int, str]:
    """(local workers, the one line that says which and why) for ``cpuflow batch --workers auto``."""
    rec = read_record(model_hash, backend=backend, precision=precision, variant=variant)
    if rec is None:
        flags = [str(model)] if model is not None else []
        flags += [f"--backend {backend}"] if backend != "openvino" else []
        flags += [f"--precision {precision}"] if precision != "auto" else []
        flags += [f"--variant {variant}"] if variant else []
        cmd = " ".join(["cpuflow bench --throughput", *flags])
        return 1, f"workers: 1 (no throughput bench for this model on this machine yet: run `{cmd}`)"
    best = int(rec["best"])
    rates = {int(k): float(v) for k, v in rec["images_per_minute"].items()}
    others = ", ".join(f"{rates[k]:.0f} with {k}" for k in sorted(rates, key=lambda k: -rates[k]) if k != best)
    vs = f" vs {others}" if others else ""
    when = f", measured {rec['measured']}" if rec.get("measured") else ""
    return best, f"workers: {best} (bench on this machine: {rates[best]:.0f} images/min with {best}{vs}{when})"


def measure(model_dir: str | os.PathLike | None, *, backend: str = "openvino", precision: str = "auto",
            variant: str | None = None, device: str = "auto", counts: list[int] | None = None,
            images: int = 8, warmup: int = 1, steps: int | None = None, width: int | None = None,
            height: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Images per minute of a batch with each worker count, on ``model_dir`` (None: the shipped
    model), at the model's default size and steps unless given. ``images`` counted images per
    count, after ``warmup`` uncounted ones per worker. Returns the record (not written)."""
    import cpuflow.batch

    from ..config import LoadConfig
    from ..cpu import default_threads
    from ..manifest import load_manifest
    from ..pipelines.model import shipped_model_dir
    if images < 2 or warmup < 1:
        raise InvalidArgument(f"--throughput needs at least 2 counted images and 1 warm-up image a worker, "
                              f"got {images} and {warmup}")
    LoadConfig(backend=backend, device=device, precision=precision, variant=variant)    # checked before any run
    model_dir = Path(model_dir) if model_dir is not None else shipped_model_dir()
    m = load_manifest(model_dir, verify="size")
    counts = counts or worker_counts(default_threads())
    fields = {k: v for k, v in (("steps", steps), ("width", width), ("height", height)) if v is not None}
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
    rates: dict[str, float] = {}
    params: dict | None = None
    tmp = Path(tempfile.mkdtemp(prefix="cpuflow-throughput-"))
    try:
        for k in counts:
            n = warmup * k + images
            stamps: list[float] = []
            jobs = [dict(fields, prompt=PROMPTS[i % 2], seed=i) for i in range(n)]
            if log:
                log(f"throughput: {k} worker(s), {n} images ...")
            s = cpuflow.batch.run(jobs, out=tmp / f"w{k}", model=model_dir, workers=k, backend=backend,
                                  device=device, precision=precision, variant=variant,
                                  progress=lambda ev: stamps.append(time.perf_counter())
                                  if ev["event"] == "image" else None)
            if s.interrupted:
                raise KeyboardInterrupt    # Ctrl-C: the batch stopped cleanly; nothing is recorded
            if s.failed or s.written != n:
                raise InvalidArgument(f"the throughput batch with {k} worker(s) failed: "
                                      f"{s.errors[0][1] if s.errors else s.line()}")
            skip = warmup * k       # the first images of each worker paid its model load and compile
            rates[str(k)] = round(60.0 * (n - skip) / (stamps[-1] - stamps[skip - 1]), 2)
            if params is None:
                first = (tmp / f"w{k}" / "results.jsonl").read_text(encoding="utf-8").splitlines()[0]
                params = {key: json.loads(first)["params"].get(key)
                          for key in ("steps", "sampler", "width", "height", "guidance")}
            if log:
                log(f"throughput: {k} worker(s): {rates[str(k)]:.1f} images/min")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(rates, key=lambda k: rates[k])
    return {"schema": SCHEMA, "model_hash": m.model_hash, "model": str(m.root), "cpu": machine_key(),
            "backend": backend, "precision": precision, "variant": variant, "images_per_minute": rates,
            "best": int(best), "images": images, "warmup": warmup, "params": params,
            "threads_per_worker": {str(k): max(1, default_threads() // k) for k in counts},
            "loadavg_before": loadavg, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "measured": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
