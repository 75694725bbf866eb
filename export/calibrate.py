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
precision used is recorded.

Memory: one sample is (2, 4, h/8, w/8) latents + 2 timesteps; the text
embeddings are shared by all steps of one prompt (the same array object), so
16 prompts x 10 steps at 512x512 hold about 21 MB of latents + 16 x 0.47 MB
of embeddings.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cpuflow.errors import InvalidArgument

PROMPTS_FILE = Path(__file__).resolve().parent / "calibration" / "prompts.txt"
DEFAULT_SIZE = 16      # prompts
DEFAULT_STEPS = 10     # sampler steps per prompt (about one UNet call each)
GUIDANCE = None        # the model's default guidance (pipelines/run.py resolves None)
# One prompt outside the shipped list: its trajectory is the held-out set on
# which each quantized UNet is compared with the fp32 one ("real inputs" PSNR).
HELD_OUT_PROMPT = "a quiet harbor with fishing boats at dawn, soft mist, photograph"
HELD_OUT_POINTS = 3    # first, middle and last call of the held-out run


@dataclass
class CalibrationSet:
    samples: list[dict[str, np.ndarray]]        # UNet feeds, one per call (CFG batch 2)
    held_out: list[dict[str, np.ndarray]]       # a few feeds of a prompt not calibrated on
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)


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


def select_prompts(prompts: list[str], size: int) -> list[str]:
    if not isinstance(size, int) or size < 1:
        raise InvalidArgument(f"calibration size must be at least 1 prompt, got {size!r}")
    if size > len(prompts):
        raise InvalidArgument(f"calibration size {size} is more than the {len(prompts)} prompts given",
                              hint="pass a smaller --calibration-size or more --calibration-prompts")
    return prompts[:size]


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def _capturing_model(config):
    """A LoadedModel whose ``unet`` calls are recorded (feeds only)."""
    from cpuflow.pipelines.model import LoadedModel

    class CapturingModel(LoadedModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.captured: list[dict[str, np.ndarray]] = []

        def run(self, component, dims, feeds):
            if component == "unet":
                # the latents are a fresh array per call; copy anyway so a later
                # in-place update by a sampler cannot change what was captured.
                # The embeddings stay shared (same object for every step).
                self.captured.append({k: (v if k == "encoder_hidden_states" else np.array(v, copy=True))
                                      for k, v in feeds.items()})
            return super().run(component, dims, feeds)

    return CapturingModel(config)


def capture(model_dir: Path, prompts: list[str], *, steps: int = DEFAULT_STEPS, backend: str = "openvino",
            seed: int = 0, guidance: float | None = GUIDANCE, threads: int | None = None, precision: str = "auto",
            progress: Callable[[str], None] | None = None) -> CalibrationSet:
    """Run the sampling loop of the exported model at ``model_dir`` on each prompt
    and return the UNet feeds of every call, plus a short held-out run.

    Each prompt is one request through the runtime's own :class:`~cpuflow.pipelines.run.Run`
    (prompt k with seed ``seed + k``, an empty negative prompt): its plan, its
    conditioning (SDXL: both text encoders, the pooled embeds, the time ids and the
    zeros of an empty negative) and its step loop (pipelines/txt2img.py
    ``sample_txt2img``; the x4 upscaler: pipelines/upscale.py ``sample_upscaled``),
    so what is captured is what a generation feeds the UNet."""
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InvalidArgument(f"calibration steps must be between 1 and 1000, got {steps!r}")
    from cpuflow.config import LoadConfig

    t0 = time.perf_counter()
    model = _capturing_model(LoadConfig(model=Path(model_dir), backend=backend, precision=precision,
                                        threads=threads, variant="fp32", use_cache=False))
    try:
        runs = []

        def run_prompt(text: str, k: int) -> list[dict[str, np.ndarray]]:
            start = len(model.captured)
            runs.append(sample_prompt(model, text, seed=seed + k, steps=steps, guidance=guidance))
            return model.captured[start:]

        for k, text in enumerate(prompts):
            run_prompt(text, k)
            if progress:
                progress(f"calibration prompt {k + 1}/{len(prompts)}: {len(model.captured)} UNet inputs")
        samples = model.captured
        model.captured = []
        held = run_prompt(HELD_OUT_PROMPT, len(prompts))
        n = len(held)
        picks = sorted({0, n // 2, n - 1})[:HELD_OUT_POINTS] if n else []
        held_out = [held[i] for i in picks]
        used_precision = model.session_infos()["unet"][0].precision   # the session that ran them
        run = runs[0]
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
        "samples": len(samples),
        "batch": 2 if run.do_cfg else 1,
        "seed": seed,
        "backend": backend,
        "precision": str(used_precision),
        "held_out_prompt": HELD_OUT_PROMPT,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return CalibrationSet(samples, held_out, info)


def sample_prompt(model, text: str, *, seed: int, steps: int, guidance: float | None):
    """One calibration request on ``model`` (a cpuflow LoadedModel): ``text`` with an empty
    negative prompt at the model's default sampler and size, sampled (never decoded) the
    way the runtime samples it; the x4 upscaler: its upscale loop on a smooth seeded
    low-res picture (the latents' size) at noise level 20. Returns the finished Run."""
    from cpuflow.config import GenerationRequest
    from cpuflow.pipelines import upscale as up
    from cpuflow.pipelines.run import Run
    from cpuflow.pipelines.txt2img import sample_txt2img

    req = GenerationRequest(prompt=text, negative_prompt="", steps=steps, guidance=guidance, seed=seed,
                            rng="torch", watermark=False)
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
