"""Orchestration: a loaded torch model -> a complete, validated model folder.

Crash safety (reliability.md item 7). Everything is written into a staging
folder ``PARENT/.NAME.staging-<random>`` beside OUT_DIR (same filesystem, so
renames are atomic); the manifest is written last, then the folder is moved in:

* OUT_DIR absent (or an empty folder): ``rename(staging, OUT_DIR)``.
* OUT_DIR a previous cpuflow export: ``rename(OUT_DIR, BACKUP)``,
  ``rename(staging, OUT_DIR)``, delete BACKUP, where BACKUP is
  ``PARENT/.NAME.cpuflow-backup``.
* anything else: refused, never touched.

So at every instant OUT_DIR is the old complete folder, the new complete one,
or (only between the two renames) absent with the old one intact at BACKUP.
The next run (and only an export holding the lock of that OUT_DIR) repairs:
OUT_DIR absent + BACKUP present -> BACKUP is renamed back; OUT_DIR complete +
BACKUP present -> BACKUP is deleted; leftover staging folders are deleted.
A per-OUT_DIR lock file (``PARENT/.NAME.cpuflow-lock``, flock) keeps two exports
to the same folder from cleaning each other's staging.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from cpuflow.errors import DiskSpaceError, ExportError, InvalidArgument, ModelError, SourceError
from cpuflow.image import fsync_dir as _fsync_dir
from cpuflow.manifest import FORMATS, MANIFEST_NAME, file_record, record_all_files, write_manifest
from cpuflow.tokenizer import ClipTokenizer, write_tokenizer_json

from . import deep_cache as dcache
from . import quantize as quant
from . import validate
from .calibrate import DEFAULT_SAMPLES as CALIBRATION_SAMPLES
from .calibrate import DEFAULT_SIZE as CALIBRATION_SIZE
from .components import component_specs, run_torch, torch_inputs, wrap_for_export
from .depth import manifest_entry as depth_entry
from .fewstep_defaults import generation_defaults, user_defaults
from .taesd import NOT_QUANTIZED as TAESD_NOT_QUANTIZED
from .taesd import TAESD_COMPONENTS
from .taesd import manifest_entry as taesd_entry
from .to_onnx import export_onnx
from .to_openvino import convert_onnx_to_openvino
from .mapped_pages import dropping_mapped_pages
from .torch_to_openvino import CONVERTER as DIRECT_CONVERTER
from .torch_to_openvino import ONNX_CONVERTER, convert_torch_to_openvino

WEIGHTS = ("fp32", "fp16")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                   "tokenizer.json", "added_tokens.json")
REQUIRED_TOKENIZER_FILES = ("vocab.json", "merges.txt")
SAFETY = 1.1  # headroom on the disk estimate (protobuf/IR overhead, small tensors, alignment)


# --- progress ----------------------------------------------------------------------
@dataclass(frozen=True)
class ProgressEvent:
    kind: str                 # "begin" | "end" | "info"
    stage: str                # e.g. "onnx export", "openvino validate", "manifest"
    component: str | None = None
    seconds: float | None = None   # on "end"
    step: int = 0             # steps finished so far (after this one, on "end")
    total: int = 0
    message: str = ""         # the status line to show

    def line(self) -> str:
        return self.message


ProgressCallback = Callable[[ProgressEvent], None]


class ConsoleProgress:
    """Status lines plus a tqdm bar over all steps, on stderr (the CLI's reporter)."""

    def __init__(self, stream=None, bar: bool | None = None):
        self.stream = stream or sys.stderr
        # a bar only on a terminal: in a log file it would be a wall of carriage returns
        self.use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None

    def __call__(self, ev: ProgressEvent) -> None:
        if self.use_bar and self.bar is None and ev.total:
            from tqdm import tqdm
            self.bar = tqdm(total=ev.total, file=self.stream, unit="step", leave=False,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        if ev.kind == "begin" and self.bar is not None:
            self.bar.set_description(f"{ev.component or 'export'}: {ev.stage}")
        if ev.kind in ("end", "info") and ev.message:
            if self.bar is not None:
                self.bar.write(ev.message, file=self.stream)
            else:
                print(ev.message, file=self.stream, flush=True)
        if ev.kind == "end" and self.bar is not None:
            self.bar.n = ev.step
            self.bar.refresh()
            if ev.step >= ev.total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Steps:
    def __init__(self, callback: ProgressCallback | None, total: int):
        self.cb = callback
        self.total = total
        self.done = 0

    def info(self, message: str, component: str | None = None) -> None:
        if self.cb:
            self.cb(ProgressEvent("info", "info", component, step=self.done, total=self.total, message=message))

    @contextmanager
    def step(self, component: str | None, stage: str, counted: bool = True) -> Iterator[None]:
        if self.cb:
            self.cb(ProgressEvent("begin", stage, component, step=self.done, total=self.total,
                                  message=f"[{component or 'export'}] {stage} ..."))
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        if counted:
            self.done += 1
        if self.cb:
            self.cb(ProgressEvent("end", stage, component, seconds=dt, step=self.done, total=self.total,
                                  message=f"[{component or 'export'}] {stage} ... {dt:.1f} s"))


def _crash_point(name: str) -> None:
    """No-op seam where tests simulate a crash (kill -9) at a precise moment."""


# --- disk and folder checks -------------------------------------------------------------
def _default_disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _param_count(module: Any) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


def estimate_bytes(loaded: Any, formats: Iterable[str], weights: str, quantize: Iterable[str] = (),
                   deep_cache: bool = False) -> int:
    """Bytes the export needs on disk at its peak: every kept file
    (weights x formats), plus the largest component's raw float32 ONNX export
    that sits beside the finished files while it is rewritten (and, without
    --format onnx, its intermediate ONNX beside the OpenVINO files).

    Each quantized variant adds about one byte per weight per format (int8
    weights + per-channel scales); ONNX Runtime's static quantization also
    writes a float32 copy of the UNet (its calibration model) plus the
    quantized model before our rewrite, in a scratch folder in the staging one."""
    formats = list(formats)
    modes = quant.check_modes(quantize)
    vae = loaded.vae
    enc = _param_count(getattr(vae, "encoder", None)) + _param_count(getattr(vae, "quant_conv", None))
    dec = _param_count(vae) - enc
    counts = [_param_count(loaded.text_encoder), _param_count(loaded.unet), dec, enc,
              _param_count(getattr(loaded, "text_encoder_2", None)),  # SDXL's second text encoder
              _param_count(getattr(loaded, "depth_estimator", None))]  # depth-to-image's DPT
    per_param = 4 if weights == "fp32" else 2
    kept = (sum(counts) + _param_count(getattr(loaded, "taesd", None))) * per_param * len(formats)
    if deep_cache:  # the full DeepCache graph holds every UNet weight again; the shallow one a part
        kept += counts[1] * per_param * len(formats) * 3 // 2
    # the raw ONNX export beside the finished files; none on the direct torch -> OpenVINO path
    transient = max(counts) * 4 if "onnx" in formats else 0
    if modes:
        kept += sum(counts) * len(modes) * len(formats)
        if "onnx" in formats and any(m in quant.NEEDS_CALIBRATION for m in modes):
            transient = max(transient, counts[1] * 4 + counts[1] * 2)
    return int(SAFETY * (kept + transient))


def _prepare_parent(out_dir: Path) -> Path:
    parent = out_dir.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgument(f"cannot create the output location {parent}: {existing} is a file, not a folder",
                              hint="choose an OUT_DIR in a writable folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot create the output location {parent}: {e.strerror or e}",
                              hint="choose an OUT_DIR in a writable folder") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"output location {parent} is not writable",
                              hint="choose an OUT_DIR in a writable folder")
    return parent


def preflight(out_dir: str | os.PathLike) -> Path:
    """Cheap checks of OUT_DIR before a (slow) source is loaded: its parent can
    be created and written, and OUT_DIR is new, empty or a cpuflow export.
    ``export_model`` repeats them; returns the absolute OUT_DIR."""
    out = _abs_out_dir(out_dir)
    _prepare_parent(out)
    if not _backup_path(out).exists():  # else the export restores the backup first
        _check_target(out)
    return out


def _abs_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(os.path.abspath(os.fspath(out_dir)))
    if out.name in ("", ".", ".."):
        raise InvalidArgument(f"OUT_DIR {out} must name a folder")
    return out


def is_cpuflow_export(path: Path) -> bool:
    m = path / MANIFEST_NAME
    if path.is_symlink() or not path.is_dir() or not m.is_file():
        return False
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == "cpuflow-model"


def _check_target(out_dir: Path) -> None:
    """Refuse an OUT_DIR that is not ours to replace."""
    if out_dir.is_symlink():
        raise InvalidArgument(f"{out_dir} is a symbolic link; pass the real folder or a new path")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InvalidArgument(f"{out_dir} exists and is not a folder; choose another OUT_DIR")
    if is_cpuflow_export(out_dir):
        added = files_not_exported(out_dir)
        if added:
            shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
            raise InvalidArgument(f"{out_dir} holds files its export did not write ({shown}); a re-export "
                                  "replaces the whole folder and would delete them",
                                  hint="move them out of the folder, or export to a new OUT_DIR")
        return
    if not any(out_dir.iterdir()):
        return
    raise InvalidArgument(
        f"{out_dir} exists and is not a cpuflow model folder (no {MANIFEST_NAME}); refusing to replace it",
        hint="choose a new or empty OUT_DIR")


def files_not_exported(out_dir: Path) -> list[str]:
    """Files in a cpuflow export that its manifest does not record (a user put them there)."""
    try:
        recorded = set(json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("files") or {})
    except (OSError, ValueError, AttributeError):
        recorded = set()
    added = []
    for dirpath, dirs, names in os.walk(out_dir, followlinks=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(dirpath, name).relative_to(out_dir).as_posix()
            if rel != MANIFEST_NAME and rel not in recorded:
                added.append(rel)
    return sorted(added)


def _backup_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.cpuflow-backup"


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.staging-"


def recover(out_dir: Path) -> list[str]:
    """Repair what a killed export left beside ``out_dir``; returns what was done.
    Call with the export lock held."""
    done = []
    backup = _backup_path(out_dir)
    if backup.exists():
        if not out_dir.exists() and is_cpuflow_export(backup):
            os.rename(backup, out_dir)
            _fsync_dir(out_dir.parent)
            done.append(f"restored the previous export from {backup.name}")
        elif is_cpuflow_export(out_dir) or not out_dir.exists():
            shutil.rmtree(backup, ignore_errors=True)
            done.append(f"removed the stale backup {backup.name}")
    prefix = _staging_prefix(out_dir)
    for p in out_dir.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the unfinished export {p.name}")
    return done


@contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    lock_path = out_dir.parent / f".{out_dir.name}.cpuflow-lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export to {out_dir} is running",
                              hint="wait for it to finish or pick another OUT_DIR") from None
        try:
            yield
        finally:
            try:
                os.unlink(lock_path)
            except OSError:
                pass
    finally:
        os.close(fd)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    _fsync_dir(staging)
    _check_target(out_dir)  # re-check: the folder may have changed during a long export
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.rename(staging, out_dir)  # onto an empty folder too (POSIX rename)
        _fsync_dir(out_dir.parent)
        return
    backup = _backup_path(out_dir)
    if backup.exists():
        shutil.rmtree(backup)
    os.rename(out_dir, backup)
    _crash_point("between-renames")
    try:
        os.rename(staging, out_dir)
    except OSError:
        os.rename(backup, out_dir)  # put the previous export back before reporting
        raise
    _fsync_dir(out_dir.parent)
    _crash_point("before-backup-delete")
    shutil.rmtree(backup, ignore_errors=True)


# --- tokenizer ---------------------------------------------------------------------
def copy_tokenizer(src: Path, dst: Path, text_max_positions: int) -> dict:
    """Copy the CLIP tokenizer files, write ``tokenizer.json`` when the source has
    none (the runtime loads it with ``tokenizers``), and read the facts the
    runtime needs with the runtime's own loader."""
    src = Path(src)
    for name in REQUIRED_TOKENIZER_FILES:
        if not (src / name).is_file():
            raise SourceError(f"tokenizer folder {src} has no {name}",
                              hint="pass --tokenizer DIR with the CLIP tokenizer files")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    try:
        write_tokenizer_json(dst)
        tok = ClipTokenizer.from_dir(dst)
    except ModelError as e:
        raise SourceError(f"the tokenizer in {src} cannot be used: {e.message}") from None
    files = [name for name in TOKENIZER_FILES if (dst / name).is_file()]
    cfg = dst / "tokenizer_config.json"  # checked to be a JSON object by from_dir
    has_length = cfg.is_file() and "model_max_length" in json.loads(cfg.read_text(encoding="utf-8-sig"))
    max_len = tok.max_length if has_length else text_max_positions
    if max_len > text_max_positions:
        raise SourceError(f"tokenizer max length {max_len} exceeds the text encoder's "
                          f"{text_max_positions} positions")
    return {"path": dst.name, "files": sorted(files), "max_length": int(max_len),
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


# --- manifest pieces ----------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    import cpuflow

    out = {"cpuflow": cpuflow.__version__}
    for name in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "openvino"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            mod = sys.modules.get(name)
            out[name] = str(getattr(mod, "__version__", "unknown"))
    out["python"] = platform.python_version()
    return out


def _release(loaded: Any, attr: str) -> None:
    try:
        setattr(loaded, attr, None)
    except (AttributeError, TypeError):  # frozen dataclass: the caller keeps it alive
        pass
    gc.collect()


# --- the export ------------------------------------------------------------------------------
def export_model(loaded: Any, out_dir: str | os.PathLike, *,
                 formats: Iterable[str] = ("onnx", "openvino"), weights: str = "fp32",
                 force: bool = False, progress: ProgressCallback | None = None,
                 disk_free: Callable[[Path], int] | None = None,
                 exporter: str = "torchscript", release_modules: bool = True,
                 seed: int = 0, quantize: Iterable[str] = (),
                 calibration_prompts: str | os.PathLike | list[str] | None = None,
                 calibration_size: int = CALIBRATION_SIZE,
                 calibration_steps: int | None = None,
                 calibration_samples: int | None = CALIBRATION_SAMPLES,
                 calibration_resolution: str | int | None = "auto",
                 default_steps: int | None = None, default_guidance: float | None = None,
                 default_clip_skip: int | None = None, deep_cache: bool = False) -> Path:
    """Export ``loaded`` (an ``export.sources.LoadedSource``) into ``out_dir``.

    formats: any of "onnx", "openvino". weights: "fp32" or "fp16" (fp16 storage
    only; compute stays float32). force: keep components that fail the parity
    gate, marked ``validated: false``. progress: called with ProgressEvents.
    disk_free: free-bytes query (tests simulate a full disk). release_modules:
    set each torch module on ``loaded`` to None once exported, so peak memory
    holds one component at a time (the caller must hold no other reference).
    quantize: any of "int8-weights", "int8", "hybrid" (see export/quantize.py):
    each adds a variant beside fp32. int8 and hybrid calibrate on the UNet
    inputs of ``calibration_size`` prompts (the first ones of
    ``calibration_prompts``: a file, a list, or None for the shipped list) run
    for ``calibration_steps`` steps each (None: the model's own default steps when it is a
    few-step model, with more prompts if the samples need them, else 10:
    export/calibrate.py ``plan_for_model``), at ``calibration_resolution`` ("auto":
    half the model's size, at least 256 px; "model"; or pixels), keeping
    ``calibration_samples`` of those UNet inputs (None: all) for the statistics
    passes (export/calibrate.py).
    default_steps / default_guidance: the manifest's generation ``defaults``
    (else decided by export/fewstep_defaults.py: Turbo, LCM, or none);
    default_clip_skip: ``defaults.clip_skip`` (A1111's meaning; the runtime's default is 1).
    deep_cache: also write the two DeepCache UNet graphs (export/deep_cache.py).
    Returns the absolute OUT_DIR."""
    user_defaults(default_steps, default_guidance)  # a bad value fails before any work
    from cpuflow.prompt_encoding import check_clip_skip
    check_clip_skip(default_clip_skip)
    formats = tuple(dict.fromkeys(formats))
    if not formats or any(f not in FORMATS for f in formats):
        raise InvalidArgument(f"formats must be a non-empty subset of {list(FORMATS)}, got {list(formats)}")
    if weights not in WEIGHTS:
        raise InvalidArgument(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if exporter not in ("torchscript", "dynamo"):
        raise InvalidArgument(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    modes = quant.check_modes(quantize)
    if getattr(loaded, "family", None) == "x4-upscaler" and getattr(loaded, "taesd", None) is not None:
        raise InvalidArgument("--taesd does not fit the x4 upscaler: its VAE has a latent space of its own "
                              "(downscale 4, scaling factor 0.08333); export it without --taesd")
    if modes and weights != "fp32":
        raise InvalidArgument("--quantize makes its variants from float32 weights; use --weights fp32 with it")
    quant.check_mode_formats(modes, formats)
    prompts = prompt_pool = None
    if any(m in quant.NEEDS_CALIBRATION for m in modes):  # a bad prompt file fails before any work
        from .calibrate import read_prompts, select_prompts
        given = calibration_prompts
        all_prompts = list(given) if isinstance(given, (list, tuple)) else read_prompts(given)
        prompt_pool = [str(p) for p in all_prompts]
        prompts = select_prompts(prompt_pool, calibration_size)
        if calibration_steps is not None and (not isinstance(calibration_steps, int)
                                              or not 1 <= calibration_steps <= 1000):
            raise InvalidArgument(f"calibration steps must be between 1 and 1000, got {calibration_steps!r}")
        if calibration_samples is not None and (not isinstance(calibration_samples, int)
                                                or calibration_samples < 1):
            raise InvalidArgument(f"calibration samples must be at least 1, got {calibration_samples!r}")
        from .calibrate import parse_resolution
        calibration_resolution = parse_resolution("auto" if calibration_resolution is None
                                                  else calibration_resolution)
    for attr in ("text_encoder", "unet", "vae"):
        if getattr(loaded, attr, None) is None:
            raise InvalidArgument(f"the loaded model has no {attr} (already exported and released?)")
    out_dir = _abs_out_dir(out_dir)
    disk_free = disk_free or _default_disk_free

    parent = _prepare_parent(out_dir)
    with _export_lock(out_dir):
        steps = _Steps(progress, total=0)
        for msg in recover(out_dir):
            steps.info(f"[export] {msg}")
        _check_target(out_dir)
        needed = estimate_bytes(loaded, formats, weights, modes, deep_cache)
        free = int(disk_free(parent))
        if free < needed:
            raise DiskSpaceError(
                f"not enough disk space in {parent}: the export needs about {needed / 1e9:.2f} GB "
                f"({needed} bytes), {free / 1e9:.2f} GB ({free} bytes) are free",
                hint="free some space or choose another OUT_DIR")
        staging = parent / f"{_staging_prefix(out_dir)}{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except OSError as e:
            raise InvalidArgument(f"cannot write in {parent}: {e.strerror or e}",
                                  hint="choose an OUT_DIR in a writable folder") from None
        try:
            _build(loaded, staging, formats=formats, weights=weights, force=force,
                   steps=steps, exporter=exporter, release_modules=release_modules, seed=seed,
                   modes=modes, prompts=prompts, prompt_pool=prompt_pool, calibration_steps=calibration_steps,
                   calibration_samples=calibration_samples, calibration_resolution=calibration_resolution,
                   default_steps=default_steps, default_guidance=default_guidance,
                   default_clip_skip=default_clip_skip, deep_cache=deep_cache)
            _crash_point("staged")
            _move_into_place(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out_dir


def _build(loaded: Any, staging: Path, *, formats: tuple[str, ...], weights: str, force: bool,
           steps: _Steps, exporter: str, release_modules: bool, seed: int,
           modes: tuple[str, ...] = (), prompts: list[str] | None = None, prompt_pool: list[str] | None = None,
           calibration_steps: int | None = None, calibration_samples: int | None = CALIBRATION_SAMPLES,
           calibration_resolution: str | int = "auto", default_steps: int | None = None,
           default_guidance: float | None = None, default_clip_skip: int | None = None,
           deep_cache: bool = False) -> None:
    te_cfg = loaded.text_encoder.config
    vae_cfg = loaded.vae.config
    # Everything read from the torch modules is read now, before they are released.
    tokenizer = copy_tokenizer(Path(loaded.tokenizer_dir), staging / "tokenizer",
                               int(te_cfg.max_position_embeddings))
    specs = component_specs(loaded, tokenizer["max_length"])
    if deep_cache:  # right after the plain unet, so the UNet is released after its last graph
        extra = dcache.specs(loaded.unet, specs["unet"])
        specs = {k: v for name, spec in specs.items()
                 for k, v in ([(name, spec)] + (list(extra.items()) if name == "unet" else []))}
    # model-specific manifest keys (SDXL: tokenizer_2, prompt options), read before modules are released
    extras = loaded.manifest_extras(staging) if hasattr(loaded, "manifest_extras") else {}
    latent = {
        "channels": int(vae_cfg.latent_channels),
        "downscale": 2 ** (len(vae_cfg.block_out_channels) - 1),
        "scaling_factor": float(vae_cfg.scaling_factor),
        "shift_factor": (None if getattr(vae_cfg, "shift_factor", None) is None
                         else float(vae_cfg.shift_factor)),
    }
    last_user = {spec.source_attr: name for name, spec in specs.items()}
    # OpenVINO only: torch -> IR directly, no ONNX intermediate (export/torch_to_openvino.py)
    direct = "onnx" not in formats
    steps.total = len(specs) * (2 + len(formats) + ("openvino" in formats) - direct) + 1
    # the tiny autoencoder, the depth estimator (run once per image) and the DeepCache graphs stay fp32
    quantizable = [n for n in specs if n not in TAESD_COMPONENTS + dcache.COMPONENTS and n != "depth_estimator"]
    if modes:  # quantize + validate per file, calibration
        steps.total += 2 * quant.count_jobs(modes, formats, quantizable) + (prompts is not None)
    steps.info(f"[export] {loaded.name}: {', '.join(formats)}, {weights} weights -> {len(specs)} components"
               + (f"; quantized variants: {', '.join(modes)}" if modes else ""))

    components: dict[str, Any] = {}
    checks: dict[str, quant.Check] = {}  # parity inputs + torch outputs, kept for the quantized variants
    exporters_used: list[str] = []
    all_passed = True
    for name in specs:  # in export order (COMPONENT_ORDER, or SDXL's with text_encoder_2)
        spec = specs[name]
        comp_dir = staging / name
        module = wrap_for_export(loaded, spec)
        if spec.side_files is not None:  # e.g. the token-embedding table, read before the module goes
            spec.config.update(spec.side_files(comp_dir, weights))
        feeds = spec.sample_inputs(spec.check_dims, seed=seed + 1)
        with steps.step(name, "torch reference"):
            ref = run_torch(module, spec, feeds)
        example = torch_inputs(spec.sample_inputs(spec.trace_dims, seed=seed), spec)
        if direct:
            with steps.step(name, "openvino convert (from torch)"):
                ov_files = convert_torch_to_openvino(module, spec, example, comp_dir, weights=weights)
            onnx_files, used = [], exporter
        else:
            with steps.step(name, "onnx export"):
                onnx_files, used = export_onnx(module, spec, example, comp_dir, weights=weights, exporter=exporter)
        if used not in exporters_used and not direct:
            exporters_used.append(used)
        if used != exporter:
            steps.info(f"[{name}] the {exporter} exporter failed; exported with {used}", name)
        del module, example
        if release_modules and last_user[spec.source_attr] == name:
            _release(loaded, spec.source_attr)
        gc.collect()

        files: dict[str, list[str]] = {}
        parity: dict[str, Any] = {}
        for fmt in formats:
            if fmt == "onnx":
                paths = onnx_files
            elif direct:
                paths = ov_files
            else:
                with steps.step(name, "openvino convert"):
                    paths = convert_onnx_to_openvino(onnx_files[0], comp_dir, weights=weights)
            with steps.step(name, f"{fmt} validate"), dropping_mapped_pages(paths[1:] if fmt == "openvino" else []):
                # OpenVINO maps the weights file and packs its own copy on the first call: the
                # mapped pages are paged out meanwhile (export/mapped_pages.py)
                out = validate.RUNNERS[fmt](paths[0], feeds)
                entry = validate.parity(ref, out, weights)
                del out
            entry["inputs"] = {k: list(v.shape) for k, v in feeds.items()}
            steps.info(validate.format_figures(name, fmt, entry), name)
            validate.gate(name, fmt, entry, force=force)
            all_passed = all_passed and entry["passed"]
            files[fmt] = [p.relative_to(staging).as_posix() for p in paths]
            parity[fmt] = entry
        if "onnx" not in formats:  # an intermediate only
            for p in onnx_files:
                p.unlink(missing_ok=True)
        if modes and name in quantizable:
            checks[name] = quant.Check(feeds, ref)  # small: the parity inputs are a few latents
        del ref, feeds
        gc.collect()

        comp = spec.spec_json()
        comp["variants"] = {"fp32": {
            "precision": "fp32" if weights == "fp32" else "fp16-weights",
            "quantization": None,
            "files": files,
            "parity": parity,
        }}
        components[name] = comp

    manifest = {
        "name": str(loaded.name),
        "family": str(loaded.family),
        "prediction_type": str(loaded.prediction_type),
        "random_weights": bool(loaded.random_weights),
        "validated": bool(all_passed),
        "scheduler": _jsonable(dict(loaded.scheduler_config)),
        "latent": latent,
        "unet_kind": str(getattr(loaded, "unet_kind", "txt2img")),  # what the UNet's input channels hold
        "default_size": {"width": int(loaded.default_size), "height": int(loaded.default_size)},
        "tokenizer": tokenizer,
        "components": components,
        **extras,
        "files": record_all_files(staging),
        "source": _jsonable(dict(loaded.source)),
        "export": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tools": tool_versions(),
            "formats": list(formats),
            "weights_dtype": weights,
            "forced": bool(force),
            "onnx_exporter": "+".join(exporters_used) if exporters_used else None,
            "ir_converter": (DIRECT_CONVERTER if direct else ONNX_CONVERTER) if "openvino" in formats else None,
        },
    }
    defaults = generation_defaults(loaded.scheduler_config, specs["unet"].config, loaded.source,
                                   steps=default_steps, guidance=default_guidance)
    if defaults:  # the user's, Turbo's or LCM's steps / guidance (export/fewstep_defaults.py)
        manifest["defaults"] = {**manifest.get("defaults", {}), **defaults}
    if depth_entry(loaded) is not None:   # the depth estimator's preprocessing, replayed by the runtime
        manifest["depth"] = depth_entry(loaded)
    if default_clip_skip is not None:   # e.g. 2 for models trained on CLIP's penultimate layer
        manifest["defaults"] = {**manifest.get("defaults", {}), "clip_skip": int(default_clip_skip)}
    if taesd_entry(getattr(loaded, "taesd_source", None)) is not None:
        manifest["export"]["taesd"] = taesd_entry(loaded.taesd_source)
        if modes:
            steps.info(f"[taesd] not quantized: {TAESD_NOT_QUANTIZED}")
    if deep_cache:
        manifest["export"]["deep_cache"] = {**specs[dcache.FULL].config["deep_cache"],
                                            "components": list(dcache.COMPONENTS)}
        if modes:
            steps.info(f"[deep cache] not quantized: {dcache.NOT_QUANTIZED}")
    if modes:
        all_passed = _add_quantized(staging, manifest, modes=modes, formats=formats, checks=checks,
                                    prompts=prompts, prompt_pool=prompt_pool,
                                    calibration_steps=calibration_steps, seed=seed,
                                    calibration_samples=calibration_samples,
                                    calibration_resolution=calibration_resolution,
                                    force=force, steps=steps) and all_passed
        manifest["validated"] = bool(all_passed)
    with steps.step(None, "manifest"):
        write_manifest(staging, manifest)
    if not all_passed:
        steps.info("[export] WARNING: parity gate failed; kept because of --force (validated: false)")


def _add_quantized(staging: Path, manifest: dict, *, modes: tuple[str, ...], formats: tuple[str, ...],
                   checks: Mapping[str, Any], prompts: list[str] | None, calibration_steps: int | None, seed: int,
                   force: bool, steps: _Steps, calibration_samples: int | None = CALIBRATION_SAMPLES,
                   calibration_resolution: str | int = "auto", prompt_pool: list[str] | None = None) -> bool:
    """Quantized variants, added after the fp32 files are complete and checked.

    Order (the manifest stays the last write of the folder):
    1. an interim fp32-only manifest is written into the staging folder, so the
       cpuflow runtime can load the staged export (the torch modules are gone);
    2. calibration: the model's own sampling loop on the prompts, capturing the
       UNet inputs (export/calibrate.py), when int8 or hybrid is asked for, in a
       child process (the runtime's compiled sessions are GBs for the SD 1.5
       UNet: that memory goes back to the system before the quantizers run);
    3. each quantized file is written from the fp32 files and checked
       (export/quantize.py); the variants go into ``manifest``'s components;
    4. the caller writes the final manifest (fp32 file records reused, the new
       files hashed), replacing the interim one, and only then moves the
       staging folder into place.
    Returns whether every quantized file passed its (loose) gate."""
    from .calibrate import capture_in_child, plan_for_model

    fp32_files = dict(manifest["files"])
    write_manifest(staging, manifest)
    calibration = None
    if prompts is not None:
        backend = "openvino" if "openvino" in formats else "onnxruntime"
        calibration_steps, prompts = plan_for_model(manifest.get("defaults"), calibration_steps, prompts,
                                                    prompt_pool or prompts, calibration_samples)
        with steps.step("unet", "calibration"):
            calibration = capture_in_child(staging, prompts, steps=calibration_steps, backend=backend, seed=seed,
                                           samples=calibration_samples, resolution=calibration_resolution)
        ci = calibration.info
        steps.info(f"[unet] calibration: {ci['samples']} UNet inputs kept ({ci['selection']}) from "
                   f"{ci['prompts']} prompts x {calibration_steps} steps "
                   f"({ci['sampler']}, {ci['width']}x{ci['height']}, held-out run "
                   f"{ci['held_out_width']}x{ci['held_out_height']}, {backend} {ci['precision']}) "
                   f"in {ci['seconds']:.1f} s", "unet")
    outcome = quant.add_variants(staging, manifest["components"], modes=modes, formats=formats,
                                 calibration=calibration, checks=checks, force=force,
                                 step=steps.step, info=lambda msg, comp=None: steps.info(msg, comp))
    cal_info = dict(calibration.info) if calibration is not None else None
    del calibration
    gc.collect()
    # Record exactly the files the variants name; anything else a tool left behind goes.
    named = {p for comp in manifest["components"].values() for var in comp["variants"].values()
             for paths in var["files"].values() for p in paths}
    files = dict(fp32_files)
    for path in sorted(staging.rglob("*")):
        rel = path.relative_to(staging).as_posix()
        if not path.is_file() or path.name == MANIFEST_NAME or rel in fp32_files:
            continue
        if rel in named:
            files[rel] = file_record(staging, rel)
        else:
            path.unlink()
    manifest["files"] = files
    manifest["export"]["quantize"] = {"modes": list(modes), "calibration": cal_info,
                                      "tolerance": quant.QUANT_TOLERANCE.to_json()}
    return outcome.all_passed
