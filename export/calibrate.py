"""Calibration data for activation quantization: the UNet inputs of real runs.

Activation ranges must come from the inputs the UNet really sees: latents at
every noise level of a sampling run, the timestep, and text embeddings of real
prompts (the unconditional one included), batched [uncond, cond] for
classifier-free guidance exactly as the runtime does. So we do not synthesise
them: we load the staged float32 export with the cpuflow runtime and run the
model's own sampling loop through the runtime's own request run (pipelines/run.py
``Run``: the same plan, conditioning, SDXL pooled embeds and time ids, and step
loop as a generation; its default sampler, ``steps`` steps, its default
guidance (the manifest's ``defaults.guidance``, else the runtime's 7.5: the
trajectory and the cond - uncond spread the int8 UNet will see; the shipped
model runs at 5), its default image size; the x4 upscaler: its upscale loop on a smooth seeded
low-res picture at noise level 20) on a list of prompts, capturing the ``unet`` feeds of
every call. The VAE never runs: only the latents' trajectory matters.

Why the runtime and not the torch modules: by the time the fp32 files are
validated the torch modules have been released (one component in memory at a
time), and the runtime is what the quantized files will be used with, so the
calibration inputs are what it feeds. The capture runs at the backend's default
precision (OpenVINO picks bf16 on CPUs with AMX / AVX512-BF16: 4x faster than
f32 for the full SD 1.5 UNet, 1.5 s against 5.9 s a call on the reference
machine): the captured latents only need to be representative, and NNCF /
ORT then measure the activation ranges on them in f32 themselves. The
precision used is recorded. The held-out run is the exception: it runs in f32
and keeps the UNet's outputs, which are the fp32 reference the quantized UNets
are measured against (``CalibrationSet.held_out_outputs``), so its feeds and
its reference come from one run.

Memory: one sample is (2, 4, h/8, w/8) latents + 2 timesteps; the text
embeddings are shared by all steps of one prompt (the same array object), so
16 prompts x 10 steps at 512x512 hold about 21 MB of latents + 16 x 0.47 MB
of embeddings: small next to the model, so samples are held, not streamed.
The held-out run keeps every one of its UNet calls (issue #15: the recorded
fidelity is pooled over all of them, export/quantize.py ``held_out_entry``):
SD 1.5 at 512x512, 10 steps = 11 calls x 128 KB of latents + one 0.47 MB
embedding = 1.9 MB (SDXL at 1024: 11 x 0.5 MB + 1.3 MB of embeddings).

Cost (issue #15 item 1). Every sample a quantizer keeps is a full float32 UNet
call in each statistics pass (ORT's ranges; NNCF's ranges, SmoothQuant and bias
correction), so the export's time is nearly proportional to the samples kept
times the UNet's cost at the calibration size. Three knobs cut it:

* resolution: the trajectories are sampled at ``calibration_resolution``
  (default: half the model's default size, at least 256 px: 256x256 for a
  512x512 model, where attention costs 1/16 and the convolutions 1/4); the
  activation ranges of the convolutions and linear layers barely depend on the
  image size. The held-out check still runs at the model's own size, so the
  recorded PSNR is what a generation at the default size gets;
* selection: of the ``prompts x calls`` inputs captured, ``samples`` are kept,
  stratified over the noise levels (sample i of n takes the call at fraction
  (i + 0.5) / n of the trajectory) and cycling through the prompts, so a few
  samples still span every noise level and several prompts;
* early stop: a prompt's run stops after the last call selected from it (the
  rest of its trajectory would be thrown away).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cpuflow.errors import InvalidArgument

PROMPTS_FILE = Path(__file__).resolve().parent / "calibration" / "prompts.txt"
# Defaults (issue #15 item 1, bench/README.md "int8 export cost"): 4 prompts x 10 steps
# captured at half size, 16 of the ~44 inputs kept. The previous default kept all of
# 16 prompts x 10 steps at full size: 160 float32 UNet calls per statistics pass.
DEFAULT_SIZE = 4       # prompts
DEFAULT_STEPS = 10     # sampler steps per prompt (about one UNet call each)
DEFAULT_SAMPLES = 16   # UNet inputs kept for the statistics passes (selected over noise levels and prompts)
RESOLUTION_CHOICES = ("auto", "model")
# A model whose manifest defaults to at most this many steps (Turbo: 1, LCM: 4, export/fewstep_defaults.py)
# calibrates on its own trajectory: those steps, with as many prompts as the samples need.
FEW_STEPS_MAX = DEFAULT_STEPS
GUIDANCE = None        # the model's default guidance (pipelines/run.py resolves None)
# One prompt outside the shipped list: its trajectory is the held-out set on
# which each quantized UNet is compared with the fp32 one ("real inputs" PSNR).
HELD_OUT_PROMPT = "a quiet harbor with fishing boats at dawn, soft mist, photograph"
# Every UNet call of the held-out run is kept (before issue #15's pooled figure: 3 of them,
# first, middle and last; manifests of that time record ``points`` 3).
UNET_OUTPUT = "out_sample"   # the exported UNet's output (export/components.py)


@dataclass
class CalibrationSet:
    samples: list[dict[str, np.ndarray]]        # UNet feeds, one per call (CFG batch 2)
    held_out: list[dict[str, np.ndarray]]       # every feed of a run of a prompt not calibrated on
    info: dict[str, Any] = field(default_factory=dict)
    # the fp32 UNet's f32 output for each held-out feed, computed by the run that made the feeds
    # (None: not computed; the quantizer then runs the fp32 file on the feeds itself)
    held_out_outputs: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.samples)


def resolution_for(model_size: int, resolution: str | int | None, multiple: int = 8) -> int:
    """Side in pixels of the calibration images: ``"auto"`` (or None) = half the
    model's default size but at least 256 (never above the model's size): 256 for
    SD 1.5, 384 for SD 2.x-768, 512 for SDXL; ``"model"`` = the model's size; an
    int = that, which must be a multiple of ``multiple`` (the VAE's downscale)."""
    if resolution in (None, "auto"):
        px = max(model_size // 2, min(model_size, 256))
        return max(multiple, px // multiple * multiple)
    if resolution == "model":
        return int(model_size)
    px = parse_resolution(resolution)
    if px % multiple:
        raise InvalidArgument(f"calibration resolution {px} is not a multiple of {multiple} (the model's "
                              "latent downscale)", hint=f"pass a multiple of {multiple}, e.g. 256")
    return px


def parse_resolution(value: str | int) -> str | int:
    """``--calibration-resolution``'s value: "auto", "model" or a side in pixels (32-4096)."""
    if isinstance(value, str) and value.strip().lower() in RESOLUTION_CHOICES:
        return value.strip().lower()
    try:
        px = int(str(value).strip().lower().removesuffix("px"))
    except ValueError:
        raise InvalidArgument(f"calibration resolution must be auto, model or a size in pixels, got {value!r}",
                              hint="e.g. --calibration-resolution 256") from None
    if not 32 <= px <= 4096:
        raise InvalidArgument(f"calibration resolution must be between 32 and 4096 pixels, got {px}")
    return px


def parse_samples(value: str | int | None) -> int | None:
    """``--calibration-samples``'s value: "all" (None) or a count >= 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise InvalidArgument(f"calibration samples must be a count or all, got {value!r}",
                              hint="e.g. --calibration-samples 16") from None
    if n < 1:
        raise InvalidArgument(f"calibration samples must be at least 1, got {n}")
    return n


def select_calls(n_prompts: int, calls: int, samples: int | None) -> list[tuple[int, int]]:
    """Which (prompt, call) inputs to keep: all of them when ``samples`` is None or
    covers every call; else sample i of n is call floor((i + 0.5) / n * calls) of
    prompt i mod n_prompts (stratified over the noise levels, cycling the prompts).
    Sorted by prompt, then call."""
    total = n_prompts * calls
    if samples is None or samples >= total:
        return [(p, c) for p in range(n_prompts) for c in range(calls)]
    picks = set()
    for i in range(samples):
        c = min(calls - 1, int((i + 0.5) / samples * calls))
        p = i % n_prompts
        while (p, c) in picks:  # only when samples > prompts x distinct calls: take a neighbour
            p = (p + 1) % n_prompts
        picks.add((p, c))
    return sorted(picks)


def read_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a text file, one a line; blank lines and ``#`` comments skipped."""
    p = Path(path) if path is not None else PROMPTS_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"cannot read the calibration prompts {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"calibration prompts {p} are not UTF-8 text") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise InvalidArgument(f"calibration prompts {p} hold no prompt (one per line, # for comments)")
    return prompts


def plan_for_model(defaults: Mapping[str, Any] | None, steps: int | None, prompts: list[str],
                   pool: list[str], samples: int | None) -> tuple[int, list[str]]:
    """(steps, prompts) of the calibration run. ``steps`` None ("auto", the default): a
    model whose manifest ``defaults.steps`` is at most :data:`FEW_STEPS_MAX` (a few-step
    model: SD-Turbo 1, LCM 4) calibrates at those steps, the trajectory it runs (issue #15:
    calibration on the sampler's own trajectory; a 10-step run would set an SD-Turbo UNet's
    activation ranges on noise levels it never sees, and its held-out figure would measure
    them too); with too few calls for ``samples``, more prompts of ``pool`` are taken
    (SD-Turbo: 16 prompts x 1 call, each one UNet call). Any other model: DEFAULT_STEPS."""
    if steps is not None:
        return steps, prompts
    own = (defaults or {}).get("steps")
    if not isinstance(own, int) or isinstance(own, bool) or not 1 <= own <= FEW_STEPS_MAX:
        return DEFAULT_STEPS, prompts
    want = len(prompts) if samples is None else -(-samples // own)
    return own, (pool[:min(len(pool), want)] if want > len(prompts) else prompts)


def select_prompts(prompts: list[str], size: int) -> list[str]:
    if not isinstance(size, int) or size < 1:
        raise InvalidArgument(f"calibration size must be at least 1 prompt, got {size!r}")
    if size > len(prompts):
        raise InvalidArgument(f"calibration size {size} is more than the {len(prompts)} prompts given",
                              hint="pass a smaller --calibration-size or more --calibration-prompts")
    return prompts[:size]


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


class _Enough(Exception):
    """Raised by the capturing model once a prompt's last selected call is recorded."""


def _capturing_model(config, keep_outputs: bool = False, lean: bool = False):
    """A LoadedModel whose ``unet`` calls are recorded (feeds; with ``keep_outputs``
    the UNet's output too, in ``outputs``); with ``stop_after`` set, the call after
    that many UNet calls raises _Enough. ``lean``: the backend memory savings of
    ``--low-memory`` (OpenVINO drops the mapped weight file's pages once it has packed
    the weights; ONNX Runtime runs without its CPU arena), not its other changes (the
    guidance pair stays one batch-2 call, as a generation runs it)."""
    from cpuflow.pipelines.model import LoadedModel

    class CapturingModel(LoadedModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.captured: list[dict[str, np.ndarray]] = []
            self.outputs: list[np.ndarray] = []
            self.stop_after: int | None = None

        def backend_options(self, cfg, cache_dir):
            options = super().backend_options(cfg, cache_dir)
            return replace(options, page_out_weights=True, cpu_arena=False) if lean else options

        def run(self, component, dims, feeds):
            if component == "unet":
                if self.stop_after is not None and len(self.captured) >= self.stop_after:
                    raise _Enough()
                # the latents are a fresh array per call; copy anyway so a later
                # in-place update by a sampler cannot change what was captured.
                # The embeddings stay shared (same object for every step).
                self.captured.append({k: (v if k == "encoder_hidden_states" else np.array(v, copy=True))
                                      for k, v in feeds.items()})
            out = super().run(component, dims, feeds)
            if component == "unet" and keep_outputs:
                self.outputs.append(np.array(out[UNET_OUTPUT], copy=True))
            return out

    return CapturingModel(config)


def capture(model_dir: Path, prompts: list[str], *, steps: int = DEFAULT_STEPS, backend: str = "openvino",
            seed: int = 0, guidance: float | None = GUIDANCE, threads: int | None = None, precision: str = "auto",
            progress: Callable[[str], None] | None = None, samples: int | None = None,
            resolution: str | int | None = "model") -> CalibrationSet:
    """Run the sampling loop of the exported model at ``model_dir`` on each prompt
    and return the UNet feeds of its calls (all of them, or ``samples`` of them
    chosen by :func:`select_calls`), plus a short held-out run.

    Each prompt is one request through the runtime's own :class:`~cpuflow.pipelines.run.Run`
    (prompt k with seed ``seed + k``, an empty negative prompt): its plan, its
    conditioning (SDXL: both text encoders, the pooled embeds, the time ids and the
    zeros of an empty negative) and its step loop (pipelines/txt2img.py
    ``sample_txt2img``; the x4 upscaler: pipelines/upscale.py ``sample_upscaled``),
    so what is captured is what a generation feeds the UNet. The calibration
    prompts run at ``resolution`` (:func:`resolution_for`; "model": the model's
    default size), the held-out prompt always at the model's default size.
    ``progress`` gets one line per prompt, with the time left."""
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InvalidArgument(f"calibration steps must be between 1 and 1000, got {steps!r}")
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise InvalidArgument(f"calibration samples must be at least 1, got {samples!r}")
    from cpuflow.config import LoadConfig

    from .eta import Eta

    t0 = time.perf_counter()
    # ONNX Runtime without its CPU memory arena (lean): the arena keeps what the biggest call
    # took (the SD 1.5 UNet at 512x512: +2.3 GB a call); OpenVINO as a generation runs it
    config = LoadConfig(model=Path(model_dir), backend=backend, precision=precision, threads=threads,
                        variant="fp32", use_cache=False)
    model = _capturing_model(config, lean=backend == "onnxruntime")
    try:
        m = model.manifest
        upscaler_model = m.family == "x4-upscaler"
        model_size = int(min(m.default_width, m.default_height))
        # the x4 upscaler's default size is its output; its UNet runs on the low-res latents: kept as is
        px = model_size if upscaler_model else resolution_for(model_size, resolution, model.size_multiple)
        size = None if px == model_size else px
        runs = []
        kept: list[dict[str, np.ndarray]] = []
        picks: list[tuple[int, int]] | None = None
        calls = 0
        unet_calls = 0

        def run_prompt(text: str, k: int, stop_after: int | None = None, px: int | None = None):
            model.captured = []
            model.stop_after = stop_after
            try:
                runs.append(sample_prompt(model, text, seed=seed + k, steps=steps, guidance=guidance, size=px))
            except _Enough:
                pass
            finally:
                model.stop_after = None
            out, model.captured = model.captured, []
            return out

        with Eta("[unet] calibration capture", len(prompts), unit="prompt", emit=progress) as eta:
            for k, text in enumerate(prompts):
                # the first prompt runs its whole trajectory: it tells how many UNet calls one makes
                last = None if picks is None else max((c for p, c in picks if p == k), default=-1) + 1
                got = run_prompt(text, k, stop_after=last, px=size) if last != 0 else []
                unet_calls += len(got)
                if picks is None:
                    calls = len(got)
                    picks = select_calls(len(prompts), calls, samples)
                kept += [got[c] for p, c in picks if p == k and c < len(got)]
                eta.update(note=f"{len(kept)} UNet inputs kept")
        used_precision = model.session_infos()["unet"][0].precision   # the session that ran them
        # The held-out run (every call: the fidelity figure pools them) runs in f32 and keeps the
        # UNet's outputs: they are the fp32 reference every quantized UNet is compared with
        # (export/quantize.py), so one f32 run makes both the feeds and the reference, where a
        # run at the calibration's precision made the feeds and a second f32 run of the fp32 file
        # the reference (issue #15 item 1). The calibration's sessions are freed first, and the
        # run is a lean one: f32 packs the weights at twice bf16's size, and without the page-out
        # of the mapped weight file (OpenVINO) the export's peak rose from 7.3 to 9.4 GB on SD 1.5
        # (bench/README.md, "int8 export cost").
        model.close()
        model = _capturing_model(replace(config, precision="f32", verify="size"), keep_outputs=True, lean=True)
        held_out = run_prompt(HELD_OUT_PROMPT, len(prompts))
        held_out_outputs = list(model.outputs)
        held_precision = model.session_infos()["unet"][0].precision
        run = runs[0]
        held_run = runs[-1]
    finally:
        model.close()
    info = {
        "prompts": len(prompts),
        "prompts_sha256": prompts_hash(prompts),
        "steps": steps,
        "sampler": run.params["sampler"],
        "guidance": run.params["guidance"],
        "width": run.width,
        "height": run.height,
        "resolution": "model" if size is None else "reduced",
        "held_out_width": held_run.width,
        "held_out_height": held_run.height,
        "held_out_calls": len(held_out),
        "samples": len(kept),
        "captured_calls_per_prompt": calls,
        "unet_calls": unet_calls,   # calibration prompts' UNet calls run (early stop included)
        "selection": ("all calls" if samples is None or len(kept) == len(prompts) * calls else
                      "stratified over the noise levels, cycling the prompts"),
        "batch": 2 if run.do_cfg else 1,
        "seed": seed,
        "backend": backend,
        "precision": str(used_precision),
        "held_out_prompt": HELD_OUT_PROMPT,
        "held_out_precision": str(held_precision),
        "held_out_reference": "the fp32 UNet's outputs in the held-out run itself",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return CalibrationSet(kept, held_out, info, held_out_outputs)


CHILD_BYTES = 1 << 30  # a UNet this big (files) is calibrated in a child process


def capture_in_child(model_dir: Path, prompts: list[str], **kwargs) -> CalibrationSet:
    """:func:`capture`, in a spawned child process when the staged UNet's files
    reach CHILD_BYTES (the full SD 1.5 UNet: its compiled sessions and the heap they
    leave behind, GBs, go back to the system when the child ends instead of staying
    under the quantizers that run next); in this process for small models, where a
    child would cost more (a second interpreter importing the runtime) than it saves.
    The child reports its progress on stderr. Records the options asked for."""
    from .ort_calibration import in_child

    unet = Path(model_dir) / "unet"
    size = sum(p.stat().st_size for p in unet.iterdir() if p.is_file()) if unet.is_dir() else 0
    kwargs.setdefault("samples", DEFAULT_SAMPLES)
    kwargs.setdefault("resolution", "auto")
    if size >= CHILD_BYTES:
        kwargs.pop("progress", None)
        cal = in_child(_capture_kw, Path(model_dir), list(prompts), kwargs)
    else:
        cal = capture(Path(model_dir), list(prompts), **kwargs)
    cal.info["asked"] = {"prompts": len(prompts), "steps": kwargs.get("steps", DEFAULT_STEPS),
                         "samples": kwargs["samples"], "resolution": kwargs["resolution"]}
    cal.info["process"] = "child" if size >= CHILD_BYTES else "export"
    return cal


def _capture_kw(model_dir: Path, prompts: list[str], kwargs: dict) -> CalibrationSet:
    return capture(model_dir, prompts, **kwargs)


def sample_prompt(model, text: str, *, seed: int, steps: int, guidance: float | None, size: int | None = None):
    """One calibration request on ``model`` (a cpuflow LoadedModel): ``text`` with an empty
    negative prompt at the model's default sampler and size (or ``size`` x ``size``), sampled
    (never decoded) the way the runtime samples it; the x4 upscaler: its upscale loop on a
    smooth seeded low-res picture (the latents' size) at noise level 20. Returns the finished Run."""
    from cpuflow.config import GenerationRequest
    from cpuflow.pipelines import upscale as up
    from cpuflow.pipelines.run import Run
    from cpuflow.pipelines.txt2img import sample_txt2img

    req = GenerationRequest(prompt=text, negative_prompt="", steps=steps, guidance=guidance, seed=seed,
                            rng="torch", watermark=False, width=size, height=size)
    upscaler = up.is_upscaler(model)
    run = Run(model, req, "upscale" if upscaler else "txt2img", keep_images=False)
    run.make_plan()
    for job in run.jobs():
        if upscaler:
            _, _, h, w = run.latent_shape()
            up.sample_upscaled(run, job, _low_res_picture(h, w, seed), up.DEFAULT_NOISE_LEVEL, None)
        else:
            sample_txt2img(run, job)
    return run


def _low_res_picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, seeded stand-in for a low-res photo (1, 3, h, w) in [-1, 1]: an 8x8 grid of
    random colours, bicubic-upscaled. The x4 upscaler's calibration needs images, not only prompts."""
    from PIL import Image

    from cpuflow.image import image_to_array
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return image_to_array(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def nbytes(samples: list[Mapping[str, np.ndarray]]) -> int:
    """Memory held by ``samples`` (shared arrays counted once)."""
    seen: dict[int, int] = {}
    for s in samples:
        for v in s.values():
            seen[id(v)] = v.nbytes
    return sum(seen.values())
