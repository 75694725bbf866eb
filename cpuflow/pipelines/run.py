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

from .. import __version__, guidance_embedding, samplers, watermark
from ..config import MAX_SEED, GenerationRequest
from ..embeddings import EmbeddingSet
from ..errors import InvalidArgument
from ..image import array_to_images
from ..prompt_encoding import PromptOptions, default_clip_skip, fit_to_unet, pad_to_same_length
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
    extras: dict[str, Any] = field(default_factory=dict)   # depth-to-image: "depth_map" (PIL, --save-depth)


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
    cond: Any                     # prompt_encoding.EncodedPrompt
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
        self.extras: dict[str, Any] = {}           # task-specific results beside the images
        # a task's last touch on each decoded image (inpainting "masked": pasted back into the picture)
        self.finish_hook: Callable[[Image.Image], Image.Image] | None = None
        self.plan = None
        self.prompt_options = PromptOptions(clip_skip=self.req.clip_skip,
                                            embeddings=EmbeddingSet.load(self.req.embeddings))
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
        """Each distinct text is encoded once per request (A1111's way: cpuflow/prompt_encoding.py)."""
        if text not in self._encoded:
            self._encoded[text] = encode_prompt(self.model, text, self.timer, self.prompt_options)
        return self._encoded[text]

    def _pair(self, prompt: str, negative: str):
        """(cond, uncond) for one prompt: encoded, cut to one chunk for an export whose
        UNet takes 77 tokens only, then padded to the same number of chunks with the
        empty prompt's encoding (A1111's pad_cond) so both fit one UNet batch."""
        cond, uncond = self.encode(prompt), None
        if self.do_cfg and sdxl.is_sdxl(self.model):  # an empty SDXL negative may mean zeros (sdxl.py)
            uncond = sdxl.negative_conditioning(self.model, negative, cond, lambda: self.encode(negative))
        elif self.do_cfg:
            uncond = self.encode(negative)
        for enc in (cond, uncond):
            for w in (enc.warnings if enc is not None else ()):
                self.warn(w)
        cond = fit_to_unet(self.model, cond, self.warnings, "the prompt")
        if uncond is not None:
            uncond = fit_to_unet(self.model, uncond, self.warnings, "the negative prompt")
            if uncond.embeddings.shape[1] != cond.embeddings.shape[1]:
                cond, uncond = pad_to_same_length(cond, uncond, self.encode(""))
        return cond, uncond

    def conditionings(self) -> Iterator[Conditioning]:
        pairs = list(zip(self.req.prompts, self.req.negative_prompts))
        if self.model.config.low_memory:
            # All prompts first, then the text encoders leave memory before the UNet comes in.
            pairs_encoded = [self._pair(prompt, negative) for prompt, negative in pairs]
            self.model.release("text_encoder")
            self.model.release("text_encoder_2")
        else:
            pairs_encoded = None
        for i, (prompt, negative) in enumerate(pairs):
            cond, uncond = pairs_encoded[i] if pairs_encoded is not None else self._pair(prompt, negative)
            yield Conditioning(prompt, negative, cond, uncond)

    def guided(self, c: Conditioning, **unet_inputs: Any) -> Callable[[np.ndarray, float], np.ndarray]:
        """The UNet with classifier-free guidance over ``c``. ``unet_inputs``:
        what a task adds (e.g. extra latent channels), passed to guided_model_fn."""
        g, dims = self.params["guidance"], self.latent_dims()
        unet_inputs.setdefault("guidance_rescale", self.req.guidance_rescale)
        # low-memory: the guidance pair as two batch-1 calls (half the UNet's activation peak)
        unet_inputs.setdefault("split_cfg", bool(self.model.config.low_memory))
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
    def sample(self, job: ImageJob, x: np.ndarray, post_step=None) -> np.ndarray:
        """Denoise ``x`` with the job's UNet; ``post_step(i, x) -> x`` runs after every
        model call (samplers.sample; inpainting with a 4-channel UNet blends there)."""
        cb = None if self.progress is None else self._step_callback(job.index)
        t0 = time.perf_counter()
        x = denoise(self.model, self.plan, job.model_fn, x, job.generator, self.req.eta, callback=cb,
                    post_step=post_step)
        self.timer.add("sampling", time.perf_counter() - t0)
        return x

    def _step_callback(self, k: int):
        progress, n_images = self.progress, self.n_images

        def cb(i, n, x, x0):
            progress({"image": k, "n_images": n_images, "step": i + 1, "n_steps": n, "latents": x, "x0": x0})
        return cb

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
        """A finished image and its record: the invisible watermark on it (unless
        the request says ``watermark=False``; cpuflow/watermark.py, skipped under
        256x256 pixels, the record says which), then keep it and hand it to ``on_image``."""
        if self.finish_hook is not None:   # e.g. inpainting's masked area pasted back into the photo
            image = self.finish_hook(image)
            rec.update(width=image.width, height=image.height)
        t0 = time.perf_counter()
        image, rec["watermark"] = watermark.apply(image, getattr(self.req, "watermark", True))
        self.timer.add("watermark", time.perf_counter() - t0)
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
        return GenerationResult(self.images, self.records, dict(t), self.warnings, self.extras)

    def variants(self) -> dict[str, str]:
        """The variant each component this image goes through runs. From the model and
        the request, not from the sessions loaded so far: the first image of a process
        (made before its decoder is loaded) records what a later one does."""
        m = self.model.manifest
        used = [c for c in ("text_encoder", "text_encoder_2", "unet") if c in m.components]
        used.append("taesd_decoder" if self.tiny else "vae_decoder")
        if self.task == "img2img":
            used.append("taesd_encoder" if self.tiny else "vae_encoder")
        return {c: self.model.variant_of(c) for c in used if c in m.components}

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
            "variant": self.variants(),
            "threads": self.model.config.threads,
            "decoder": req.decoder,
            "cpuflow_version": __version__,
        }
        if p["sampler"] == "ddim":
            rec["eta"] = req.eta
        rec["clip_skip"] = req.clip_skip if req.clip_skip is not None else default_clip_skip(m)
        if req.embeddings:
            rec["embeddings"] = list(req.embeddings)
        if req.guidance_rescale:
            rec["guidance_rescale"] = req.guidance_rescale
        if m.a1111_hash:   # A1111's "Model hash" of the source checkpoint (single-file exports)
            rec["source_model_hash"] = m.a1111_hash
        if self.plan is not None:   # what the A1111 text says about reproducing the image
            rec.update(scheduler_class=self.plan.diffusers_class, karras_sigmas=self.plan.karras,
                       timestep_spacing=self.plan.config.get("timestep_spacing"))
        rec.update(self.record_extra)
        rec.update(extra)
        return rec
