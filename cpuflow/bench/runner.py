"""Plan and run a benchmark: configurations x stages, one worker process each.

The runner itself never loads a model: it reads the manifest (to resolve the
defaults and to drop configurations the folder cannot run), starts
``python -m cpuflow.bench.worker`` for every (configuration, stage) -- and for
every start of the load stage -- and gathers their JSON into one result dict
(see ``bench/README.md`` for its layout). Order of work:

1. ``load``: per configuration, ``warmup + repeat`` "first starts", each in a
   fresh process with an EMPTY compiled-model cache folder (so each one really
   compiles), the last of which fills the configuration's cache; then
   ``warmup + repeat`` "second starts" in fresh processes on that cache.
2. ``text``, ``unet``, ``vae``, ``e2e`` (``upscale`` for an x4 upscaler): one process per configuration and
   stage (load with the warm cache, ``warmup`` uncounted calls, ``repeat``
   counted ones).

Stages run in that order with the configurations interleaved inside each
stage, so slow drift of the machine (thermal, other load) spreads over all
configurations instead of penalising the last one; ``rounds`` > 1 repeats every
stage but load round by round (cpuflow, torch, peers, cpuflow, ...). The peers
(OpenVINO GenAI, optimum-intel: :mod:`.peers`) are columns of kind ``peer`` with
the e2e and load stages only.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .. import __version__
from ..config import BACKENDS, PRECISIONS, LoadConfig
from ..errors import CpuflowError, InvalidArgument, MissingDependency
from .peers import PEER_LABEL, PEER_STAGES, PEERS, PeerRef, check_peer
from .worker import DEFAULT_STAGES, PROGRESS_PREFIX, STAGES, unet_batch

SCHEMA = "cpuflow-bench/1"
ARCHES = ("sd15", "sd21", "sd21-v", "sd15-lcm", "sd21-turbo", "sdxl", "sd15-inpaint", "x4-upscaler")
NO_TAESD_ARCHES = ("x4-upscaler",)   # its VAE has its own latent space (downscale 4): no tiny autoencoder fits
# --arch sdxl is exported OpenVINO-only: the direct torch -> IR path fits the 2.6 B-parameter UNet in
# 24 GB where the ONNX path (a second copy of the weights) does not (export/torch_to_openvino.py)
ARCH_FORMAT = {"sdxl": "openvino"}
NO_TORCH_REFERENCE = {
    "sdxl": "no torch reference for SDXL: export/bench_reference.py builds StableDiffusionPipeline (SD 1.x/2.x) "
            "only, and at full size diffusers' float32 SDXL (3.5 B parameters, 14 GB of weights) would not "
            "fit beside the export's benchmark on a 24 GB machine; the cpuflow columns were measured without it"}
ARCH_SEED = 0                     # the random weights' seed for --arch models (export and reference alike)
GIB = 1024 ** 3
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
STAGE_ORDER = ("load", "text", "depth", "unet", "vae", "taesd", "e2e", "upscale")   # load first: it fills the compiled cache
LogFn = Callable[[str], None]


# ---------------------------------------------------------------- what to run
@dataclass(frozen=True)
class BenchConfig:
    """One cpuflow configuration: a column of the report."""

    backend: str
    variant: str | None          # None: the model's preferred variant
    precision: str
    device: str = "auto"

    @property
    def id(self) -> str:
        return f"{self.backend}/{self.variant or 'default'}/{self.precision}"


@dataclass
class BenchSettings:
    width: int | None = None          # None: the model's default
    height: int | None = None
    steps: int = 20
    guidance: float = 7.5
    threads: int | None = None
    repeat: int = 3
    warmup: int = 1
    stages: tuple[str, ...] = DEFAULT_STAGES
    prompt: str = DEFAULT_PROMPT
    gen_seed: int = 0
    decoder: str = "full"             # e2e's decoder: full VAE or taesd (the tiny autoencoder)
    # False: no compiled-model cache on disk; every process compiles, the load stage has first starts
    # only (the OpenVINO cache of a full-size SDXL is about as big as its fp32 weights: 10+ GB)
    compile_cache: bool = True
    # every stage but load runs this many times per column, the columns interleaved inside each
    # round (cpuflow, peer, cpuflow, peer ...): the machine's drift over the run (measured: the same
    # image 125 s, then 143 s an hour later) spreads over every engine; the report gives the best
    rounds: int = 1

    def __post_init__(self):
        self.stages = parse_stages(self.stages)
        if self.decoder not in ("full", "taesd"):
            raise InvalidArgument(f"decoder must be full or taesd, got {self.decoder!r}")
        for name, lo in (("repeat", 1), ("warmup", 0), ("steps", 1), ("rounds", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidArgument(f"{name} must be a whole number >= {lo}, got {v!r}")
        if not 0 <= float(self.guidance) <= 100:
            raise InvalidArgument(f"guidance must be between 0 and 100, got {self.guidance!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0 or v % 8):
                raise InvalidArgument(f"{name} must be a positive multiple of 8, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidArgument(f"threads must be a positive whole number, got {self.threads!r}")


def parse_stages(stages: str | Iterable[str]) -> tuple[str, ...]:
    """'text,unet' or an iterable -> validated tuple in the canonical order."""
    items = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in STAGES]
    if bad or not items:
        raise InvalidArgument(f"stages must be a comma-separated subset of {','.join(STAGES)}, "
                              f"got {','.join(items) or 'nothing'}")
    return tuple(s for s in STAGE_ORDER if s in items)


def make_configs(manifest, backends: Sequence[str], variants: Sequence[str | None], precisions: Sequence[str],
                 device: str = "auto") -> tuple[list[BenchConfig], list[str]]:
    """Every backend x variant x precision the model can run, and a note for
    each combination dropped (and why). onnxruntime has no precision hint, so
    its ``auto`` and ``f32`` are one configuration."""
    from ..pipelines.model import FORMAT_OF_BACKEND
    from ..variants import variants_in

    configs: list[BenchConfig] = []
    notes: list[str] = []
    all_variants = sorted({v for c in manifest.components.values() for v in c.variants})
    for b in dict.fromkeys(backends):
        if b not in BACKENDS:
            raise InvalidArgument(f"backend must be one of {', '.join(BACKENDS)}, got {b!r}")
        if FORMAT_OF_BACKEND[b] not in manifest.formats():
            notes.append(f"skipped --backend {b}: the model has no {FORMAT_OF_BACKEND[b]} files")
            continue
        seen_ort = False
        for v in dict.fromkeys(variants):
            if v is not None and v not in all_variants:
                notes.append(f"skipped {b}/{v}: the model has no variant {v} (it has {', '.join(all_variants)})")
                continue
            if v is not None and v not in variants_in(manifest, FORMAT_OF_BACKEND[b]):
                notes.append(f"skipped {b}/{v}: the variant has no {FORMAT_OF_BACKEND[b]} files")
                continue
            for p in dict.fromkeys(precisions):
                if p not in PRECISIONS:
                    raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
                try:
                    LoadConfig(backend=b, device=device, precision=p, variant=v)
                except InvalidArgument as e:
                    notes.append(f"skipped {b}/{v or 'default'}/{p}: {e}")
                    continue
                if b == "onnxruntime":
                    if seen_ort and p in ("auto", "f32"):
                        notes.append(f"skipped {b}/{v or 'default'}/{p}: onnxruntime has no precision hint "
                                     "(auto = f32), measured once")
                        continue
                    seen_ort = True
                configs.append(BenchConfig(b, v, p, device))
            seen_ort = False
    if not configs:
        raise InvalidArgument("no configuration to run: " + "; ".join(notes))
    return configs, notes


# ---------------------------------------------------------------- models for --arch
def bench_models_dir() -> Path:
    from ..backends.cache import default_cache_dir
    return default_cache_dir() / "bench-models"


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))


def _python_env() -> dict[str, str]:
    """Child processes import this very cpuflow (a source checkout need not be installed)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ensure_arch_model(arch: str, *, rebuild: bool = False, root: Path | None = None,
                      tokenizer: str | os.PathLike | None = None, log: LogFn | None = None) -> tuple[Path, dict]:
    """The full-size random-weights export of ``arch`` (built once, cached in
    ``<cache>/bench-models/<arch>-random``, ONNX + OpenVINO (SDXL: OpenVINO only), seed
    :data:`ARCH_SEED`). ``tokenizer``: a CLIP tokenizer folder for the export
    when the Hugging Face cache has none (the vocabulary does not change
    latency; the random text encoder has CLIP's 49408 tokens either way).
    Returns (folder, build record); the record says how long the export took
    and its peak RSS when this call built it."""
    from ..manifest import load_manifest

    if arch not in ARCHES:
        raise InvalidArgument(f"arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    root = Path(root) if root is not None else bench_models_dir()
    out = root / f"{arch}-random"
    sidecar = root / f"{arch}-random.bench.json"
    if (out / "cpuflow.json").is_file() and sidecar.is_file() and not rebuild:
        rec = json.loads(sidecar.read_text(encoding="utf-8"))
        m = load_manifest(out, verify="size")
        if rec.get("model_hash") == m.model_hash and rec.get("seed") == ARCH_SEED:
            return out, dict(rec, built_now=False)
    if not torch_available():
        raise MissingDependency(f"--arch {arch} builds a random-weights export once, which needs the export "
                                "extra (torch, diffusers, transformers)",
                                hint="pip install 'cpuflow[export]', or pass an exported MODEL_DIR")
    root.mkdir(parents=True, exist_ok=True)
    # with a random tiny autoencoder too (seconds to export), for the taesd stage and --decoder taesd
    cmd = [sys.executable, "-m", "cpuflow.cli", "export", "--random-weights", "--arch", arch,
           "--seed", str(ARCH_SEED)] + ([] if arch in NO_TAESD_ARCHES else ["--taesd", "random"]) + [str(out)]
    if arch in ARCH_FORMAT:
        cmd[-1:-1] = ["--format", ARCH_FORMAT[arch]]
    if tokenizer is not None:
        cmd[-1:-1] = ["--tokenizer", str(tokenizer)]
    if log:
        log(f"building the {arch} random-weights model once (cached in {out}): {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_python_env())
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise CpuflowError(f"building the {arch} bench model failed (exit code {rc}); see the messages above")
    m = load_manifest(out, verify="size")
    rec = {"arch": arch, "seed": ARCH_SEED, "model_hash": m.model_hash, "export_s": round(seconds, 2),
           "export_peak_rss_bytes": int(usage.ru_maxrss) * 1024, "built": _now()}
    sidecar.write_text(json.dumps(rec, indent=2), encoding="utf-8")
    return out, dict(rec, built_now=True)


# ---------------------------------------------------------------- the machine
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"cpuflow": __version__}
    for name in ("openvino", "onnxruntime", "numpy", "torch", "diffusers", "transformers", "nncf", "openvino-genai",
                 "openvino-tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads: int | None) -> dict[str, Any]:
    from ..cpu import cpu_features, default_threads, describe

    feats = cpu_features()
    return {
        "cpu": feats,
        "cpu_summary": describe(feats),
        "memory_total_bytes": _mem_total(),
        "threads": {"requested": threads, "default": default_threads(), "usable_cores": feats.get("usable_cores")},
        "platform": platform.platform(),
        "versions": package_versions(),
        "git_commit": _git_commit(),
        "date": _now(),
    }


# ---------------------------------------------------------------- workers
@dataclass
class Measurement:
    column: str                 # config id or "torch"
    stage_key: str              # text | unet | vae | e2e | load_first | load_second | load
    spec: dict
    units: int                  # progress-bar units this job reports
    counted: bool = True        # False: a warm-up start of the load stage
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    python: str | None = None   # the worker's interpreter (None: this one; a peer may have its own)


def _run_worker(job: Measurement, work: Path, n: int, bar, timeout: float | None) -> dict:
    spec_path = work / f"job-{n:03d}.json"
    out_path = work / f"job-{n:03d}.out.json"
    log_path = work / f"job-{n:03d}.log"
    spec_path.write_text(json.dumps(job.spec, indent=1), encoding="utf-8")
    cmd = [job.python or sys.executable, "-m", "cpuflow.bench.worker", str(spec_path), str(out_path)]
    done = 0
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_python_env(),
                                bufsize=1)
        fired: list[bool] = []
        watchdog = threading.Timer(timeout, lambda: (fired.append(True), proc.kill())) if timeout else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    if bar is not None and done < job.units:
                        bar.update(1)
                    done += 1
                else:
                    log.write(line)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
    if bar is not None and done < job.units:
        bar.update(job.units - done)
    if out_path.is_file():
        res = json.loads(out_path.read_text(encoding="utf-8"))
    else:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        why = (f"killed after --timeout {timeout:g} s" if fired else
               f"the worker exited with code {proc.returncode} and wrote no result")
        res = {"ok": False, "error": why, "error_type": "Timeout" if fired else "WorkerCrashed", "log_tail": tail}
    if not res.get("ok"):
        res.setdefault("log_tail", log_path.read_text(encoding="utf-8", errors="replace")[-2000:])
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    return res


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def _summarise(stage_key: str, runs: list[dict], counted: list[bool]) -> dict[str, Any]:
    """One stage of one column from its worker results (one, or one per start)."""
    ok = [r for r in runs if r.get("ok")]
    errors = [r for r in runs if not r.get("ok")]
    times: list[float] = []
    warm: list[float] = []
    for r, c in zip(runs, counted):
        if r.get("ok"):
            (times if c else warm).extend(r.get("times_s", []))
            warm.extend(r.get("warmup_times_s", []))

    def gib(v):
        return None if v is None else round(v / GIB, 3)

    peaks = [r["peak_rss_bytes"] for r in ok if r.get("peak_rss_bytes")]
    run_peaks = [r["run_peak_rss_bytes"] for r in ok if r.get("run_peak_rss_bytes")]
    after_load = [r["rss_after_load_bytes"] for r in ok if r.get("rss_after_load_bytes")]
    out: dict[str, Any] = {
        "times_s": [round(t, 6) for t in times],
        "warmup_times_s": [round(t, 6) for t in warm],
        "median_s": round(statistics.median(times), 6) if times else None,
        "min_s": round(min(times), 6) if times else None,
        "max_s": round(max(times), 6) if times else None,
        "mean_s": round(statistics.fmean(times), 6) if times else None,
        "peak_rss_bytes": max(peaks) if peaks else None,
        "peak_rss_gib": gib(max(peaks)) if peaks else None,
        "run_peak_rss_gib": gib(max(run_peaks)) if run_peaks else None,
        "rss_after_load_gib": gib(max(after_load)) if after_load else None,
        "load_s": [round(r["load_s"], 4) for r in ok if "load_s" in r],
        "processes": len(runs),
        "error": errors[0].get("error") if errors else None,
    }
    if errors:
        out["error_type"] = errors[0].get("error_type")
        out["error_log_tail"] = errors[0].get("log_tail", "")[-1000:]
    for key in ("breakdown", "unet_batch", "sampler", "load_from", "weights_check"):
        vals = [r[key] for r in ok if key in r]
        if vals:
            out[key] = [row for v in vals for row in v] if key == "breakdown" else vals[0]
    if stage_key.startswith("load"):  # one process per start: what each start compiled or found cached
        out["starts"] = [{"counted": c, "ok": bool(r.get("ok")), "seconds": _round((r.get("times_s") or [None])[0]),
                          "import_s": _round(r.get("import_s")), "process_wall_s": r.get("wall_s"),
                          "peak_rss_gib": gib(r.get("peak_rss_bytes")),
                          "components": {k: {"compile_s": v.get("compile_s"), "cached": v.get("cached")}
                                         for k, v in (r.get("sessions") or {}).items()}}
                         for r, c in zip(runs, counted)]
    return out


def _base_spec(settings: BenchSettings, width: int, height: int, model_dir: Path) -> dict:
    return {"model": str(model_dir), "width": width, "height": height, "steps": settings.steps,
            "guidance": float(settings.guidance), "threads": settings.threads, "prompt": settings.prompt,
            "gen_seed": settings.gen_seed, "warmup": settings.warmup, "repeat": settings.repeat,
            "decoder": settings.decoder}


def _plan(configs: list[BenchConfig], settings: BenchSettings, base: dict, work: Path,
          reference: dict | None, peers: Sequence = ()) -> list[Measurement]:
    """Every worker job in run order: per stage, ``settings.rounds`` rounds (load: one), each
    round one job per column in column order (cpuflow configurations, torch, the peers)."""
    jobs: list[Measurement] = []
    n_starts = settings.warmup + settings.repeat
    units = 1 + settings.warmup + settings.repeat
    caches = {c.id: work / "cache" / c.id.replace("/", "-") / "shared" for c in configs}
    for stage in settings.stages:
        for _ in range(1 if stage == "load" else settings.rounds):
            for c in configs:
                spec = dict(base, kind="cpuflow", stage=stage, backend=c.backend, variant=c.variant,
                            precision=c.precision, device=c.device, cache_dir=str(caches[c.id]))
                if not settings.compile_cache:  # every process compiles from the model files
                    spec["cache_dir"] = None
                    if stage == "load":
                        jobs.extend(Measurement(c.id, "load_first", spec, 1, counted=i >= settings.warmup)
                                    for i in range(n_starts))
                    else:
                        jobs.append(Measurement(c.id, stage, spec, units))
                elif stage == "load":
                    for i in range(n_starts):
                        # every first start gets an empty cache folder; the last one leaves the shared cache filled
                        d = caches[c.id] if i == n_starts - 1 else caches[c.id].parent / f"first-{i}"
                        jobs.append(Measurement(c.id, "load_first", dict(spec, cache_dir=str(d)), 1,
                                                counted=i >= settings.warmup,
                                                before=lambda d=d: shutil.rmtree(d, ignore_errors=True),
                                                after=None if d == caches[c.id] else
                                                lambda d=d: shutil.rmtree(d, True)))
                    for i in range(n_starts):
                        jobs.append(Measurement(c.id, "load_second", spec, 1, counted=i >= settings.warmup))
                else:
                    jobs.append(Measurement(c.id, stage, spec, units))
            if reference is not None and stage != "taesd" and not (stage == "e2e" and settings.decoder == "taesd"):
                # (none for the tiny autoencoder: the torch reference has the full VAE only)
                # every reference process checks its weights against the export (after measuring)
                spec = dict(base, **reference, kind="torch", stage=stage, check_weights=True)
                if stage == "load":
                    jobs.extend(Measurement("torch", "load", spec, 1, counted=i >= settings.warmup)
                                for i in range(n_starts))
                else:
                    jobs.append(Measurement("torch", stage, spec, units))
            if stage in PEER_STAGES:   # with --decoder taesd too: a peer has only its full VAE (noted)
                for p in peers:
                    spec = dict(base, kind=p.engine, stage=stage, source=str(p.source), precision=p.precision,
                                check_weights=True)
                    if stage == "load":   # each start a fresh process: build + compile from the IR
                        jobs.extend(Measurement(p.id, "load", spec, 1, counted=i >= settings.warmup,
                                                python=p.python) for i in range(n_starts))
                    else:
                        jobs.append(Measurement(p.id, stage, spec, units, python=p.python))
    return jobs


def stages_for_model(manifest, stages: tuple[str, ...], log: LogFn | None = None) -> tuple[str, ...]:
    """An x4 upscaler's end to end is one whole upscale (stage ``upscale``, to the model's default
    size from a quarter of it: 128 -> 512), not a text-to-image: e2e becomes upscale for it, and
    upscale is refused for other models."""
    from ..manifest import UPSCALER_FAMILY
    if manifest.family == UPSCALER_FAMILY:
        if "e2e" in stages and log:
            log("note: an x4 upscaler's end to end is the upscale stage (one whole upscale)")
        return parse_stages(["upscale" if st == "e2e" else st for st in stages if st != "taesd"])
    if "upscale" in stages:
        raise InvalidArgument("the upscale stage needs an x4 upscaler folder (or --arch x4-upscaler)")
    return stages


def reference_source_for(manifest, reference_source: str | None, arch: str | None) -> dict:
    """What the torch reference loads: an explicit source, else the random
    architecture the model was built from (``--arch``, or a MODEL_DIR exported
    with --random-weights). Random weights and single files get the exported
    folder's own tokenizer (they carry none)."""
    tok = str(manifest.path(manifest.tokenizer["path"]))
    if reference_source:
        single_file = Path(reference_source).expanduser().is_file()
        return {"source": str(reference_source), "arch": None, "seed": None, "tokenizer": tok if single_file else None}
    if arch:
        return {"source": None, "arch": arch, "seed": ARCH_SEED, "tokenizer": tok}
    src = manifest.raw.get("source", {})
    if manifest.random_weights and src.get("kind") == "random" and src.get("name") in ARCHES:
        return {"source": None, "arch": src["name"], "seed": ARCH_SEED, "tokenizer": tok}
    raise InvalidArgument("--reference torch needs the torch weights of this model: pass --reference-source "
                          "SOURCE (the diffusers folder or checkpoint it was exported from), or use --arch")


def run_bench(model_dir: str | os.PathLike, configs: Sequence[BenchConfig], settings: BenchSettings, *,
              reference: str | None = None, reference_source: str | None = None, arch: str | None = None,
              show_progress: bool = True, log: LogFn | None = None, job_timeout: float | None = None,
              notes: Sequence[str] = (), build_record: dict | None = None,
              peers: Sequence[PeerRef] = ()) -> dict[str, Any]:
    """Run every job and return the result dict (the JSON the CLI writes). ``reference="torch"``
    adds diffusers; ``peers`` the GenAI / optimum-intel columns (cpuflow/bench/peers.py), each
    checked (package importable, folder readable) before anything is measured."""
    from ..manifest import load_manifest
    from ..pipelines.model import SAMPLER_OF_SCHEDULER

    peers = list(peers)   # checked first: a missing package or bad folder stops the run before anything
    if reference in PEERS:
        raise InvalidArgument(f"--reference {reference} is a peer: pass it as peers=[PeerRef(...)]")
    for p in peers:
        check_peer(p)
    if peers and not {"e2e", "load"} & set(settings.stages):
        raise InvalidArgument("the peer references measure the stages e2e and load only: add one of them to "
                              "--stages")
    if len({p.id for p in peers}) != len(peers):
        raise InvalidArgument("two peer columns with the same engine, folder name and precision: " +
                              ", ".join(p.id for p in peers))
    model_dir = Path(model_dir).resolve()
    m = load_manifest(model_dir, verify="size")
    settings.stages = stages_for_model(m, settings.stages, log)
    width = settings.width or m.default_width
    height = settings.height or m.default_height
    ref = None
    notes = list(notes)
    if reference is not None and m.family in NO_TORCH_REFERENCE:
        notes.append(NO_TORCH_REFERENCE[m.family])
        if log:
            log(f"note: {NO_TORCH_REFERENCE[m.family]}")
        reference = None
    if reference is not None:
        if reference != "torch":
            raise InvalidArgument(f"reference must be torch, got {reference!r}")
        if not torch_available():
            raise MissingDependency("--reference torch runs diffusers, which needs the export extra",
                                    hint="pip install 'cpuflow[export]'")
        ref = reference_source_for(m, reference_source, arch)
    base = _base_spec(settings, width, height, model_dir)
    work = Path(tempfile.mkdtemp(prefix="cpuflow-bench-"))
    why = cache_does_not_fit(m, list(configs), work) if settings.compile_cache else None
    if why:
        settings.compile_cache = False
        notes.append(why)
        if log:
            log(f"note: {why}")
    if peers and settings.decoder == "taesd" and "e2e" in settings.stages:
        why = ("--decoder taesd: the cpuflow images are decoded by the tiny autoencoder, the peers' by their full "
               "VAE decoder (neither GenAI nor optimum-intel runs TAESD in its SD pipeline)")
        notes.append(why)
        if log:
            log(f"note: {why}")
    jobs = _plan(list(configs), settings, base, work, ref, peers)
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(j.units for j in jobs), unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)
    results: dict[tuple[str, str], list[tuple[dict, bool]]] = {}
    t_start = time.perf_counter()
    try:
        for n, job in enumerate(jobs):
            if bar is not None:
                bar.set_description(f"{job.column} {job.stage_key}")
            if job.before:
                job.before()
            res = _run_worker(job, work, n, bar, job_timeout)
            if job.after:
                job.after()
            results.setdefault((job.column, job.stage_key), []).append((res, job.counted))
            if not res.get("ok") and log:
                log(f"{job.column} {job.stage_key}: {res.get('error_type', 'error')}: {res.get('error')}")
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(work, ignore_errors=True)

    columns: list[dict[str, Any]] = []
    for c in configs:
        columns.append({"id": c.id, "kind": "cpuflow", "backend": c.backend, "variant": c.variant,
                        "precision": c.precision, "device": c.device})
    if ref is not None:
        columns.append({"id": "torch", "kind": "reference", "backend": "torch", "variant": "fp32",
                        "precision": "f32", "device": "cpu", "source": ref})
    for p in peers:
        columns.append({"id": p.id, "kind": "peer", "backend": p.engine, "label": PEER_LABEL[p.engine],
                        "variant": None, "precision": p.precision, "device": "cpu", "source": str(p.source),
                        "python": p.python})
    for col in columns:
        col["stages"] = {}
        col["ran"] = {}
        for (cid, key), runs in results.items():
            if cid != col["id"]:
                continue
            col["stages"][key] = _summarise(key, [r for r, _ in runs], [c for _, c in runs])
            for r, _ in runs:  # what each component really ran on (the last report wins; they agree)
                for comp, facts in (r.get("sessions") or {}).items():
                    col["ran"][comp] = {k: facts.get(k) for k in ("backend", "device", "precision", "variant",
                                                                   "threads")}
    result = {
        "schema": SCHEMA,
        "machine": machine_info(settings.threads),
        "model": {"path": str(model_dir), "name": m.name, "family": m.family, "prediction_type": m.prediction_type,
                  "random_weights": m.random_weights, "model_hash": m.model_hash, "arch": arch,
                  "formats": sorted(m.formats()),
                  "variants": sorted({v for c in m.components.values() for v in c.variants}),
                  "build": build_record},
        "settings": {"width": width, "height": height, "steps": settings.steps, "guidance": float(settings.guidance),
                     "threads": settings.threads, "repeat": settings.repeat, "warmup": settings.warmup,
                     "stages": list(settings.stages), "decoder": settings.decoder, "prompt": settings.prompt,
                     "compile_cache": settings.compile_cache,
                     "seed": settings.gen_seed,
                     "sampler": SAMPLER_OF_SCHEDULER.get(str(m.scheduler.get("_class_name", "")), "euler"),
                     "unet_batch": unet_batch(m, settings.guidance),
                     "rounds": settings.rounds,
                     "reference": reference, "peers": [p.id for p in peers]},
        "configs": columns,
        "ratios": speedups(columns),
        "peer_comparison": peer_comparison(columns),
        "notes": list(notes) + ([
            "torch RSS: diffusers loads the whole pipeline, so every torch stage's peak includes all three "
            "components (run_peak_rss_gib in the JSON is the peak of the calls alone)"] if ref else []),
        "total_s": round(time.perf_counter() - t_start, 2),
    }
    return result


def cache_does_not_fit(manifest, configs: Sequence[BenchConfig], work: Path,
                       disk_free: Callable[[Path], int] | None = None) -> str | None:
    """Why the compiled-model cache is turned off (None: it fits). OpenVINO's
    cache of a model is about as big as its IR weights (measured: over 13 GB for
    full-size SDXL), one cache per OpenVINO configuration, written into the
    bench's temporary folder; it must leave 2 GiB of the disk free (the runtime's
    own rule for a new blob, cpuflow.backends.cache.room_for_blob)."""
    from ..backends.cache import room_for_blob

    n = sum(1 for c in configs if c.backend == "openvino")
    if not n:
        return None
    weights = sum(int(info.get("size", 0)) for rel, info in manifest.files.items() if rel.endswith(".bin"))
    fits, free = room_for_blob(work, n * weights, free_bytes=disk_free)
    if fits:
        return None
    return (f"no compiled-model cache (as --no-compile-cache): {n} OpenVINO cache(s) of about "
            f"{weights / GIB:.1f} GiB each would not fit the {free / GIB:.1f} GiB free in {work.parent}; "
            "every process compiles, the load stage has first starts only")


REF_LOAD_FOR = {"load_first": "load", "load_second": "load"}


def speedups(columns: list[dict]) -> dict[str, dict[str, float | None]]:
    """{config id: {stage: torch median / config median}}: above 1, cpuflow is
    faster. None where either side has no number, and for loads when the torch
    reference built random weights instead of reading files."""
    ref = next((c for c in columns if c["kind"] == "reference"), None)
    if ref is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for col in columns:
        if col["kind"] != "cpuflow":
            continue
        row: dict[str, float | None] = {}
        for key, st in col["stages"].items():
            rst = ref["stages"].get(REF_LOAD_FOR.get(key, key))
            ok = (rst is not None and rst.get("median_s") and st.get("median_s")
                  and not (key in REF_LOAD_FOR and str(rst.get("load_from", "")).startswith("random")))
            row[key] = round(rst["median_s"] / st["median_s"], 3) if ok else None
        out[col["id"]] = row
    return out


def _best(col: dict, key: str = "e2e") -> float | None:
    st = col["stages"].get(key) or {}
    return st.get("min_s")


def peer_comparison(columns: list[dict], target: float = 0.7) -> dict[str, Any] | None:
    """Each cpuflow configuration's best whole image against the fastest peer's best
    (issue 15: cpuflow's default variant must take <= ``target`` x that time, with a peak
    RSS no higher). None without peer columns or without e2e numbers."""
    peers = [c for c in columns if c["kind"] == "peer" and _best(c) is not None]
    if not peers:
        return None
    fastest = min(peers, key=_best)
    fb = _best(fastest)
    frss = (fastest["stages"]["e2e"].get("peak_rss_gib"))
    rows = {}
    for c in columns:
        if c["kind"] != "cpuflow" or _best(c) is None:
            continue
        ratio = round(_best(c) / fb, 3)
        rss = c["stages"]["e2e"].get("peak_rss_gib")
        rows[c["id"]] = {"best_s": _best(c), "ratio": ratio, "met": ratio <= target,
                         "peak_rss_gib": rss, "rss_not_higher": None if rss is None or frss is None else rss <= frss}
    return {"stage": "e2e", "statistic": "best (min) over rounds x repetitions", "target_ratio": target,
            "fastest_peer": fastest["id"], "fastest_peer_best_s": fb, "fastest_peer_peak_rss_gib": frss,
            "cpuflow": rows}
