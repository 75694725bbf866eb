"""Validated configuration: what is loaded, and what is generated.

Both objects are frozen dataclasses validated on construction, so the CLI, the
Python API and the server share one set of rules and one wording of errors:
each message names the field, the value and the rule.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidArgument, ResourceLimitError

BACKENDS = ("openvino", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "f32")
SCHEDULES = ("default", "karras")
DECODERS = ("full", "taesd")    # taesd: the tiny autoencoder (export --taesd)

MAX_STEPS = 1000
MAX_SAMPLES = 64
MAX_PIXELS = 2048 * 2048          # per image; larger requests are refused up front
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 100.0


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidArgument(f"{name} must be a whole number, got {value!r}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be finite, got {value!r}")
    return value


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def random_seed() -> int:
    """A fresh seed in 0..2**32-1 (recorded with the image, so it can be reused)."""
    return secrets.randbelow(MAX_SEED + 1)


@dataclass(frozen=True)
class LoadConfig:
    """What is loaded and how it runs."""

    model: Path | None = None          # None: the model shipped with cpuflow
    backend: str = "openvino"
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    variant: str | None = None         # None: the first present of pipelines/model.py VARIANT_PREFERENCE
    cache_dir: Path | None = None      # None: the user cache dir; see backends/cache.py
    use_cache: bool = True
    verify: str = "size"               # size | sha256
    low_memory: bool = False           # one component in memory at a time, tiled VAE decode

    def __post_init__(self):
        _choice("backend", self.backend, BACKENDS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("verify", self.verify, ("size", "sha256"))
        if self.threads is not None:
            t = _int("threads", self.threads)
            if not 1 <= t <= 1024:
                raise InvalidArgument(f"threads must be between 1 and 1024, got {t}")
        if self.backend == "openvino" and self.device == "cuda":
            raise InvalidArgument("device cuda runs on the onnxruntime backend; use --backend onnxruntime")
        if self.backend == "onnxruntime" and self.precision == "bf16":
            raise InvalidArgument("precision bf16 is an OpenVINO hint; use --backend openvino for bf16")
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` fields take the model's defaults when the
    pipeline resolves the request (see :meth:`resolved`)."""

    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] = ""
    steps: int | None = None
    sampler: str | None = None
    schedule: str = "default"
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None            # None: a random seed, recorded
    n_samples: int = 1
    eta: float = 0.0                   # ddim only
    init_image: Any = None             # path, bytes or PIL image: img2img
    strength: float = 0.8              # img2img only
    rng: str = "torch"                 # torch-compatible noise (same image as diffusers) | numpy
    decoder: str = "full"              # full VAE | taesd (the tiny autoencoder; img2img encodes with it too)
    deep_cache: int | None = None      # DeepCache: full UNet every N calls (export --deep-cache); None/1: off

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        prompts = self._texts("prompt", self.prompt)
        negs = self._texts("negative_prompt", self.negative_prompt)
        if len(negs) not in (1, len(prompts)):
            raise InvalidArgument(f"negative_prompt has {len(negs)} entries but prompt has {len(prompts)}; "
                                  "give one negative prompt or one per prompt")
        set_("prompt", prompts if len(prompts) > 1 else prompts[0])
        set_("negative_prompt", negs if len(negs) > 1 else negs[0])
        if self.steps is not None:
            s = _int("steps", self.steps)
            if not 1 <= s <= MAX_STEPS:
                raise InvalidArgument(f"steps must be between 1 and {MAX_STEPS}, got {s}")
            set_("steps", s)
        if self.guidance is not None:
            g = _float("guidance", self.guidance)
            if not 0 <= g <= MAX_GUIDANCE:
                raise InvalidArgument(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {g:g}")
            set_("guidance", g)
        _choice("schedule", self.schedule, SCHEDULES)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None:
                v = _int(name, v)
                if v <= 0:
                    raise InvalidArgument(f"{name} must be positive, got {v}")
                if v % 8:
                    raise InvalidArgument(f"{name} must be a multiple of 8, got {v}")
                set_(name, v)
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise ResourceLimitError(f"{self.width}x{self.height} is over the pixel budget of {MAX_PIXELS} "
                                     "pixels per image (2048x2048)")
        if self.seed is not None:
            sd = _int("seed", self.seed)
            if not 0 <= sd <= MAX_SEED:
                raise InvalidArgument(f"seed must be between 0 and {MAX_SEED}, got {sd}")
            set_("seed", sd)
        n = _int("n_samples", self.n_samples)
        if not 1 <= n <= MAX_SAMPLES:
            raise InvalidArgument(f"n_samples must be between 1 and {MAX_SAMPLES}, got {n}")
        eta = _float("eta", self.eta)
        if not 0 <= eta <= 1:
            raise InvalidArgument(f"eta must be between 0 and 1, got {eta:g}")
        st = _float("strength", self.strength)
        if not 0 <= st <= 1:
            raise InvalidArgument(f"strength must be between 0 and 1, got {st:g}")
        set_("strength", st)
        _choice("rng", self.rng, ("torch", "numpy"))
        _choice("decoder", self.decoder, DECODERS)
        if self.deep_cache is not None:
            n = _int("deep_cache", self.deep_cache)
            if not 1 <= n <= MAX_STEPS:
                raise InvalidArgument(f"deep_cache must be between 1 and {MAX_STEPS} (full UNet every N calls; "
                                      f"1: off), got {n}")
            set_("deep_cache", n)
        if self.sampler is not None:
            from .samplers import SAMPLERS  # the one registry the CLI, API and server read
            _choice("sampler", self.sampler, tuple(SAMPLERS))

    @staticmethod
    def _texts(name: str, value: Any) -> tuple[str, ...]:
        if value is None:
            value = ""
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{name} must be a string or a non-empty list of strings")
        for v in value:
            if len(v) > MAX_PROMPT_CHARS:
                raise ResourceLimitError(f"{name} has {len(v)} characters; the limit is {MAX_PROMPT_CHARS}")
        return tuple(value)

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.prompt if isinstance(self.prompt, tuple) else (self.prompt,)

    @property
    def negative_prompts(self) -> tuple[str, ...]:
        negs = self.negative_prompt if isinstance(self.negative_prompt, tuple) else (self.negative_prompt,)
        return negs if len(negs) == len(self.prompts) else negs * len(self.prompts)

    def with_seed(self) -> "GenerationRequest":
        """The same request with a concrete seed (a random one when none was given)."""
        return self if self.seed is not None else replace(self, seed=random_seed())

