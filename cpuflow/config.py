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
# Noise schedules (--schedule): "default" is what the model's scheduler config says
# (its own use_karras_sigmas included); "karras" forces Karras sigmas on, "uniform" off.
SCHEDULES = ("default", "karras", "uniform")
DECODERS = ("full", "taesd")    # taesd: the tiny autoencoder (export --taesd)
# How an init image is brought to the working size (cpuflow/resize.py): crop (default) | fit | stretch.
RESIZE_MODES = ("crop", "fit", "stretch")

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
    variant: str | None = None         # None: chosen by measured fidelity (cpuflow/variants.py)
    cache_dir: Path | None = None      # None: the user cache dir; see backends/cache.py
    use_cache: bool = True
    verify: str = "sha256"             # sha256: content, each file hashed once then remembered
                                       # (cpuflow/file_digests.py) | size: sizes only
    low_memory: bool = False           # one component in memory at a time, tiled VAE decode
    max_session_bytes: int | None = None   # compiled sessions kept (LRU); None: half the RAM

    def __post_init__(self):
        _choice("backend", self.backend, BACKENDS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("verify", self.verify, ("size", "sha256"))
        if self.threads is not None:
            t = _int("threads", self.threads)
            if not 1 <= t <= 1024:
                raise InvalidArgument(f"threads must be between 1 and 1024, got {t}")
        if self.max_session_bytes is not None and _int("max_session_bytes", self.max_session_bytes) < 1:
            raise InvalidArgument(f"max_session_bytes must be positive, got {self.max_session_bytes}")
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
    guidance_rescale: float = 0.0      # Lin et al. 2023 eq. 16 (diffusers' guidance_rescale); 0: off
    width: int | None = None
    height: int | None = None
    seed: int | None = None            # None: a random seed, recorded
    n_samples: int = 1
    eta: float = 0.0                   # ddim only
    init_image: Any = None             # path, bytes or PIL image: img2img
    resize: str = "crop"               # init image -> working size: crop | fit | stretch (cpuflow/resize.py)
    strength: float = 0.8              # img2img only
    rng: str = "torch"                 # torch-compatible noise (same image as diffusers) | numpy
    decoder: str = "full"              # full VAE | taesd (the tiny autoencoder; img2img encodes with it too)
    mask: Any = None                   # path, bytes or PIL image: inpainting (white = repaint), with init_image
    mask_blur: int = 0                 # Gaussian blur radius in pixels applied to the mask first
    inpaint_area: str = "whole"        # whole image | "masked": only the region around the mask, at model size
    padding: int = 32                  # "masked": pixels of context around the mask's bounding box
    depth_map: Any = None              # path, bytes or PIL image: depth-to-image with this depth, not an estimate
    clip_skip: int | None = None       # None: the model's default; 1 = the text encoder's own layer (A1111)
    embeddings: tuple[str, ...] = ()   # textual-inversion files, "FILE" or "FILE:TOKEN" (cpuflow/embeddings.py)
    watermark: bool = True             # the invisible watermark (cpuflow/watermark.py) on every image
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
        gr = _float("guidance_rescale", self.guidance_rescale)
        if not 0 <= gr <= 1:
            raise InvalidArgument(f"guidance_rescale must be between 0 and 1, got {gr:g}")
        set_("guidance_rescale", gr)
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
        _choice("resize", self.resize, RESIZE_MODES)
        if self.mask is not None or self.mask_blur or self.inpaint_area != "whole" or self.padding != 32:
            from . import inpaint_mask
            set_("mask_blur", inpaint_mask.int_in_range("mask_blur", self.mask_blur, 0, inpaint_mask.MAX_BLUR))
            set_("padding", inpaint_mask.int_in_range("padding", self.padding, 0, inpaint_mask.MAX_PADDING))
            inpaint_mask.check_area(self.inpaint_area)
            if self.mask is None:
                raise InvalidArgument("mask_blur / inpaint_area / padding apply to inpainting; give a mask too")
            if self.init_image is None:
                raise InvalidArgument("a mask needs an init image (the picture to repaint)",
                                      hint="pass --init-image with --mask")
        from .prompt_encoding import check_clip_skip
        check_clip_skip(self.clip_skip)
        if isinstance(self.embeddings, str) or not all(isinstance(e, str) for e in self.embeddings):
            raise InvalidArgument("embeddings must be a list of file paths (FILE or FILE:TOKEN)")
        set_("embeddings", tuple(self.embeddings))
        if not isinstance(self.watermark, bool):
            raise InvalidArgument(f"watermark must be true or false, got {self.watermark!r}")
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
            try:   # the text goes into the image's metadata as UTF-8: refuse what UTF-8 cannot hold
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                # a lone surrogate ("\ud800" in JSON), or a byte that is not UTF-8 on a command
                # line (Python keeps such bytes as the surrogates U+DC80..U+DCFF)
                o = ord(v[e.start])
                what = (f"the byte \\x{o - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= o <= 0xDCFF
                        else f"a lone surrogate \\u{o:04x}")
                raise InvalidArgument(f"{name} is not valid text: character {e.start + 1} is {what}",
                                      hint="write the text in UTF-8") from None
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



#: The largest image `cpuflow upscale` takes: 1024x1024 pixels in (4096x4096 out). Tiles bound
#: the memory at any size; this bounds the time (hours on a laptop at the limit) and the output.
MAX_UPSCALE_INPUT_PIXELS = 1024 * 1024
MIN_TILE = 32                     # --tile below this would be mostly overlap


@dataclass(frozen=True)
class UpscaleRequest:
    """What to upscale (x4 upscaler, cpuflow/pipelines/upscale.py). The prompt, steps,
    sampler, guidance, seed... follow the rules of :class:`GenerationRequest` (one set
    of rules: ``generation`` is that request, built and validated here). ``noise_level``
    None: the model's default (20); its range (0..max_noise_level, 350) is checked
    against the model. ``tile`` None: automatic; N: the UNet and VAE work on latent
    tiles of at most N x N (a tile covering the image gives exactly the untiled image)."""

    image: Any                         # path, bytes or PIL image
    prompt: str = ""
    negative_prompt: str = ""
    noise_level: int | None = None
    steps: int | None = None
    sampler: str | None = None
    schedule: str = "default"
    guidance: float | None = None
    seed: int | None = None
    eta: float = 0.0
    rng: str = "torch"
    tile: int | None = None
    watermark: bool = True             # the invisible watermark on the upscaled image
    generation: GenerationRequest = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.image is None:
            raise InvalidArgument("no image to upscale was given")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidArgument("prompt and negative_prompt of an upscale must be strings")
        gen = GenerationRequest(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                                sampler=self.sampler, schedule=self.schedule, guidance=self.guidance,
                                seed=self.seed, eta=self.eta, rng=self.rng, watermark=self.watermark)
        object.__setattr__(self, "generation", gen)
        if self.noise_level is not None:
            n = _int("noise_level", self.noise_level)
            if n < 0:
                raise InvalidArgument(f"noise_level must be between 0 and the model's max_noise_level, got {n}")
            object.__setattr__(self, "noise_level", n)
        if self.tile is not None:
            t = _int("tile", self.tile)
            if t < MIN_TILE or t % 8:
                raise InvalidArgument(f"tile must be a multiple of 8 and at least {MIN_TILE}, got {t}")
            object.__setattr__(self, "tile", t)
