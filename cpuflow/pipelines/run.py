"""What every task shares: one request run against one loaded model.

A task (txt2img.py, img2img.py, and the tasks built on the same pieces) is a
short function over a :class:`Run`::

    run = Run(model, req, "txt2img", progress, on_image)
    run.make_plan()
    for job in run.jobs():
        x = run.sample(job, job.noise(run.latent_shape()))
        run.finish_image(job, x)
    return run.result()

The run owns the decisions every task would otherwise repeat: the request's
values resolved against the model's defaults, the sampling plan, whether the
UNet runs a negative branch (:func:`uses_cfg`), the prompt conditioning (each
distinct text encoded once per request), one generator per image seeded
``seed + k``, decoding (full VAE, tiled, or the tiny autoencoder), the record
of what made each image, and low-memory mode (the UNet and the VAE decoder are
each loaded once per request: all images are sampled first, then all decoded).

Images of one request are made one at a time, each from its own seed
(seed, seed+1, ...), so image k of a batch is the image a request with seed+k
would give, memory stays at one image's worth, and every image records the seed
that reproduces it. ``on_image(image, record)`` is called as soon as an image
is finished, so a caller can write it before the next one starts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from .. import __version__, guidance_embedding, samplers
from ..config import MAX_SEED, GenerationRequest
from ..errors import InvalidArgument
from ..image import array_to_images
from ..rng import make_generator
from . import deep_cache, sdxl
from .model import LoadedModel, StageTimer
from .stages import TILE_LATENTS, decode_latents, decode_tiled, denoise, encode_prompt, guided_model_fn
from .taesd import decode_taesd, require_taesd

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5

# progress(event) where event is a dict: {"image": k, "n_images": n, "step": i, "n_steps": s, "latents": x, "x0": x0}
ProgressFn = Callable[[dict], None]
# on_image(image, record): called once per finished image, in order
ImageFn = Callable[[Image.Image, dict], None]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    records: list[dict[str, Any]]          # one per image: everything that made it
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def uses_cfg(manifest, guidance: float) -> bool:
    """Does the UNet run a negative branch (batch 2)? Only when guidance > 1, and
    never for a UNet that takes the guidance as an embedding (LCM; diffusers does
    the same). The one place this is decided: the pipelines, the bench and the
    calibration all ask here."""
    return guidance > 1.0 and guidance_embedding.embedding_dim(manifest) is None


def resolve_params(model: LoadedModel, req: GenerationRequest) -> dict[str, Any]:
    """The request's sampler, steps, guidance and size, with the model's defaults
    (its manifest's ``defaults``, else cpuflow's) where the request has none."""
    m = model.manifest
    defaults = m.raw.get("defaults", {})
    return {
        "sampler": req.sampler or model.default_sampler(),
        "steps": req.steps if req.steps is not None else int(defaults.get("steps", DEFAULT_STEPS)),
        "guidance": req.guidance if req.guidance is not None else float(defaults.get("guidance", DEFAULT_GUIDANCE)),
        "width": check_size_multiple(model, "width", req.width or m.default_width),
        "height": check_size_multiple(model, "height", req.height or m.default_height),
    }


def check_size_multiple(model: LoadedModel, name: str, value: int) -> int:
    mult = model.size_multiple
    if value % mult:
        raise InvalidArgument(f"{name} must be a multiple of {mult} for this model, got {value} "
                              f"(try {max(mult, value // mult * mult)})")
    return value


@dataclass
class Conditioning:
    """One prompt / negative prompt pair, encoded, and the guided UNet over it."""
    prompt: str
    negative: str
    cond: Any                     # EncodedPrompt or sdxl.SDXLEncodedPrompt
    uncond: Any                   # the same, or None without a negative branch


@dataclass
class ImageJob:
    """One image of the request: its index, texts, seed and generator."""
    index: int
    conditioning: Conditioning
    seed: int
    generator: Any
    model_fn: Callable[[np.ndarray, float], np.ndarray]

    def noise(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.generator.randn(shape)


class Run:
    """One request on one model: the shared state and stages of every task."""

    def __init__(self, model: LoadedModel, req: GenerationRequest, task: str,
                 progress: ProgressFn | None = None, on_image: ImageFn | None = None, *,
                 keep_images: bool = True):
        self.model = model
        self.req = req.with_seed()
        self.task = task
        self.progress = progress
        self.on_image = on_image
        self.keep_images = keep_images
        self.params = resolve_params(model, self.req)
        self.tiny = self.req.decoder == "taesd"
        if self.tiny:
            require_taesd(model, img2img=task != "txt2img")
        self.deep_cache = self.req.deep_cache if deep_cache.enabled(self.req.deep_cache) else None
        self.timer = StageTimer()
        self.warnings: list[str] = []
        self.images: list[Image.Image] = []
        self.records: list[dict[str, Any]] = []
        self.record_extra: dict[str, Any] = {}     # task-specific fields for every record
        self.plan = None
        self._encoded: dict[str, Any] = {}
        self._pending: list[tuple[np.ndarray, dict]] = []   # low-memory: sampled, not yet decoded
        self._t_start = time.perf_counter()
        self._load_before = model.load_seconds
        if self.deep_cache is not None:   # a folder without the graphs fails before any work
            deep_cache.require(model)
            self.record_extra["deep_cache"] = self.deep_cache
            if model.variant_of("unet") != "fp32":
                self.warn(f"--deep-cache runs the fp32 DeepCache graphs instead of the {model.variant_of('unet')} "
                          "unet (they are not quantized)")

    # -- what the request resolves to --------------------------------------------------
    @property
    def width(self) -> int:
        return self.params["width"]

    @property
    def height(self) -> int:
        return self.params["height"]

    @property
    def n_images(self) -> int:
        return len(self.req.prompts) * self.req.n_samples

    def set_size(self, width: int, height: int) -> None:
        """The size comes from elsewhere (img2img: the init image)."""
        self.params["width"] = check_size_multiple(self.model, "width", width)
        self.params["height"] = check_size_multiple(self.model, "height", height)

    def make_plan(self, strength: float = 1.0):
        self.plan = samplers.make_plan(self.params["sampler"], self.model.scheduler_config(), self.params["steps"],
                                       schedule=self.req.schedule, strength=strength)
        return self.plan

    @property
    def do_cfg(self) -> bool:
        return uses_cfg(self.model.manifest, self.params["guidance"])

    def latent_dims(self) -> dict[str, int]:
        return self.model.latent_dims(self.width, self.height, 1)

    def latent_shape(self) -> tuple[int, int, int, int]:
        d = self.latent_dims()
        return (1, self.model.manifest.latent_channels, d["latent_height"], d["latent_width"])

    # -- prompts ----------------------------------------------------------------------
    def encode(self, text: str):
        """Each distinct text is encoded once per request."""
        if text not in self._encoded:
            encode = sdxl.encode_prompt if sdxl.is_sdxl(self.model) else encode_prompt
            self._encoded[text] = encode(self.model, text, self.timer)
        return self._encoded[text]

    def conditionings(self) -> Iterator[Conditioning]:
        pairs = list(zip(self.req.prompts, self.req.negative_prompts))
        if self.model.config.low_memory:
            # All prompts first, then the text encoders leave memory before the UNet comes in.
            for prompt, negative in pairs:
                self.encode(prompt)
                if self.do_cfg:
                    self.encode(negative)
            self.model.release("text_encoder")
            self.model.release("text_encoder_2")
        xl = sdxl.is_sdxl(self.model)
        for prompt, negative in pairs:
            cond = self.encode(prompt)
            uncond = None
            if self.do_cfg:
                if xl:  # an empty SDXL negative prompt may mean zeros (cpuflow/pipelines/sdxl.py)
                    uncond = sdxl.negative_conditioning(self.model, negative, cond, lambda: self.encode(negative))
                else:
                    uncond = self.encode(negative)
            for note, enc in (("prompt", cond), ("negative prompt", uncond)):
                if enc is not None and enc.truncated:
                    self.warn(f"{note} is longer than the text encoder's {self.model.max_length} tokens; "
                              f"dropped: {enc.dropped_text!r}")
            yield Conditioning(prompt, negative, cond, uncond)

    def guided(self, c: Conditioning, **unet_inputs: Any) -> Callable[[np.ndarray, float], np.ndarray]:
        """The UNet with classifier-free guidance over ``c``. ``unet_inputs``:
        what a task adds (e.g. extra latent channels), passed to guided_model_fn."""
        g, dims = self.params["guidance"], self.latent_dims()
        if self.deep_cache is not None:
            unet_inputs = dict(unet_inputs, deep_cache=self.deep_cache)
        if sdxl.is_sdxl(self.model):
            return sdxl.guided_model_fn(self.model, c.cond, c.uncond, g, dims, self.timer, self.width,
                                        self.height, **unet_inputs)
        return guided_model_fn(self.model, c.cond.embeddings, None if c.uncond is None else c.uncond.embeddings,
                               g, dims, self.timer, **unet_inputs)

    def jobs(self, **unet_inputs: Any) -> Iterator[ImageJob]:
        """Every image of the request, in order: prompt by prompt, n_samples each,
        seeds seed, seed+1, ... across the whole request."""
        k = 0
        for c in self.conditionings():
            for _ in range(self.req.n_samples):
                seed = (self.req.seed + k) % (MAX_SEED + 1)
                # one UNet function per image: DeepCache's cache starts empty for each
                yield ImageJob(k, c, seed, make_generator(self.req.rng, seed), self.guided(c, **unet_inputs))
                k += 1

    # -- stages -----------------------------------------------------------------------
    def sample(self, job: ImageJob, x: np.ndarray) -> np.ndarray:
        cb = None
        if self.progress is not None:
            progress, k, n_images = self.progress, job.index, self.n_images

            def cb(i, n, x, x0):
                progress({"image": k, "n_images": n_images, "step": i + 1, "n_steps": n, "latents": x, "x0": x0})
        t0 = time.perf_counter()
        x = denoise(self.model, self.plan, job.model_fn, x, job.generator, self.req.eta, callback=cb)
        self.timer.add("sampling", time.perf_counter() - t0)
        return x

    def decode(self, x: np.ndarray) -> Image.Image:
        if self.tiny:
            decoded = decode_taesd(self.model, x, self.timer)   # small at any size: no tiling needed
        elif self.model.config.low_memory and max(x.shape[-2:]) > TILE_LATENTS:
            decoded = decode_tiled(self.model, x, self.timer)
        else:
            d = self.model.manifest.downscale
            decoded = decode_latents(self.model, x, x.shape[-1] * d, x.shape[-2] * d, self.timer, self.warnings)
        return array_to_images(decoded)[0]

    def finish_image(self, job: ImageJob, x: np.ndarray, **record: Any) -> None:
        """Decode the sampled latents of ``job`` and hand the image on. In
        low-memory mode the decode waits for :meth:`result`, so the UNet and the
        VAE decoder are each in memory once per request, not once per image."""
        rec = self.record(job, **record)   # now, while the sessions that made it are loaded
        if self.model.config.low_memory and not self.tiny:
            self._pending.append((x, rec))
            return
        self.emit(self.decode(x), rec)

    def emit(self, image: Image.Image, rec: dict[str, Any]) -> None:
        """A finished image and its record: keep it, and hand it to ``on_image``."""
        if self.keep_images:
            self.images.append(image)
        self.records.append(rec)
        if self.on_image is not None:
            self.on_image(image, rec)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # -- the result -------------------------------------------------------------------
    def result(self) -> GenerationResult:
        if self._pending:
            for name in ("unet", *deep_cache.COMPONENTS):
                self.model.release(name)
            pending, self._pending = self._pending, []
            for x, rec in pending:
                self.emit(self.decode(x), rec)
            self.model.release("vae_decoder")
        t = self.timer.seconds
        t["load_compile"] = self.model.load_seconds - self._load_before
        for w in self.model.take_load_warnings():   # each once, for the request that loaded it
            self.warn(w)
        t["total"] = time.perf_counter() - self._t_start
        unet_calls = (self.plan.n_model_calls if self.plan is not None else 0) * len(self.records)
        if unet_calls:
            t["unet_per_call"] = t.get("unet", 0.0) / unet_calls
        t.pop("sampling", None)
        for rec in self.records:
            rec["timings"] = {k: round(v, 4) for k, v in t.items()}
        return GenerationResult(self.images, self.records, dict(t), self.warnings)

    def record(self, job: ImageJob, **extra: Any) -> dict[str, Any]:
        m, req, p = self.model.manifest, self.req, self.params
        sessions = self.model.session_infos()
        unet_info = sessions.get("unet", (None, None))[0]
        rec = {
            "task": self.task,
            "prompt": job.conditioning.prompt,
            "negative_prompt": job.conditioning.negative,
            "seed": job.seed,
            "sampler": p["sampler"],
            "schedule": req.schedule,
            "steps": p["steps"],
            "guidance": p["guidance"],
            "width": self.width,
            "height": self.height,
            "rng": req.rng,
            "model_name": m.name,
            "model_hash": m.model_hash,
            "random_weights": m.random_weights,
            "backend": self.model.config.backend,
            "device": unet_info.device if unet_info else self.model.config.device,
            "precision": unet_info.precision if unet_info else self.model.config.precision,
            "variant": {name: variant for name, (_, variant) in sessions.items()},
            "threads": self.model.config.threads,
            "decoder": req.decoder,
            "cpuflow_version": __version__,
        }
        if p["sampler"] == "ddim":
            rec["eta"] = req.eta
        rec.update(self.record_extra)
        rec.update(extra)
        return rec
