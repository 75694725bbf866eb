"""Command-line options shared by the commands that run a model (`generate`, `upscale`):
one definition each, so their names, defaults and help read the same everywhere."""
from __future__ import annotations

from typing import Callable

import click

from .config import SCHEDULES


def _apply(options: list[Callable]) -> Callable:
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


#: How the model runs: engine, device, precision, variant, threads, compiled-model cache.
load_options = _apply([
    click.option("--backend", type=click.Choice(["openvino", "onnxruntime"]), default="openvino",
                 help="Inference engine (default openvino: fastest on Intel/AMD CPUs)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                 help="cuda needs --backend onnxruntime with onnxruntime-gpu."),
    click.option("--precision", type=click.Choice(["auto", "bf16", "f32"]), default="auto",
                 help="OpenVINO precision hint: auto picks bf16 on CPUs with AMX/AVX512-BF16, else f32."),
    click.option("--variant", default=None, help="Model variant (fp32, int8, ...; default: the fastest whose measured fidelity passes, see `cpuflow info`)."),
    click.option("--threads", type=int, default=None, help="CPU threads (default: all physical cores)."),
    click.option("--no-cache", is_flag=True, help="Do not use the compiled-model cache."),
])

#: How the sampler runs: negative prompt, steps, sampler, schedule, guidance, eta, seed, noise generator.
sampling_options = _apply([
    click.option("--negative-prompt", "-n", default="", help="What the image should not show."),
    click.option("--steps", type=int, default=None,
                 help="Denoising steps (default: the model's, from its export: 1 for SD-Turbo, 4 for an LCM, "
                      "else 20)."),
    click.option("--sampler", default=None, help="Sampler (default: the model's own scheduler). "
                 "One of: ddim, plms, euler, euler_a, heun, dpmpp_2m, lcm."),
    click.option("--schedule", type=click.Choice(list(SCHEDULES)), default="default",
                 help="Noise schedule: default = what the model's scheduler config says; karras / uniform "
                      "force Karras sigmas on / off."),
    click.option("--guidance", "-g", type=float, default=None,
                 help="Classifier-free guidance scale (default: the model's, usually 7.5; 9 for the x4 upscaler; "
                      "0 for SD-Turbo; 1 or less skips the negative branch: 2x faster)."),
    click.option("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)."),
    click.option("--seed", type=int, default=None, help="Seed 0..4294967295 (default: random, printed and saved)."),
    click.option("--rng", type=click.Choice(["torch", "numpy"]), default="torch",
                 help="Noise generator: torch (same images as diffusers for a seed) or numpy."),
])
