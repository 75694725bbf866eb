"""The generation loop shared by txt2img and img2img.

Images of one request are made one at a time, each from its own seed
(seed, seed+1, ...), so image k of a batch is the image a request with seed+k
would give, memory stays at one image's worth, and every image records the seed
that reproduces it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from .. import __version__, guidance_embedding, samplers, watermark
from ..config import MAX_SEED, GenerationRequest
from ..errors import InvalidArgument
from ..image import array_to_images, image_to_array, load_init_image
from ..rng import make_generator
from . import sdxl
from .model import LoadedModel, StageTimer
from .stages import TILE_LATENTS, decode_latents, decode_tiled, denoise, encode_image, encode_prompt, guided_model_fn
from .taesd import decode_taesd, encode_taesd, require_taesd

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5

# progress(event) where event is a dict: {"image": k, "n_images": n, "step": i, "n_steps": s, "latents": x, "x0": x0}
ProgressFn = Callable[[dict], None]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    records: list[dict[str, Any]]          # one per image: everything that made it
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _resolve(model: LoadedModel, req: GenerationRequest) -> dict[str, Any]:
    m = model.manifest
    sampler = req.sampler or model.default_sampler()
    steps = req.steps if req.steps is not None else int(m.raw.get("defaults", {}).get("steps", DEFAULT_STEPS))
    guidance = req.guidance if req.guidance is not None else float(
        m.raw.get("defaults", {}).get("guidance", DEFAULT_GUIDANCE))
    width = req.width or m.default_width
    height = req.height or m.default_height
    mult = model.size_multiple
    for name, v in (("width", width), ("height", height)):
        if v % mult:
            raise InvalidArgument(f"{name} must be a multiple of {mult} for this model, got {v} "
                                  f"(try {max(mult, v // mult * mult)})")
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "width": width, "height": height}


def generate(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None) -> GenerationResult:
    req = req.with_seed()
    r = _resolve(model, req)
    is_img2img = req.init_image is not None
    tiny = req.decoder == "taesd"
    if tiny:
        require_taesd(model, img2img=is_img2img)
    timer = StageTimer()
    t_start = time.perf_counter()
    load_before = model.load_seconds

    init_pixels = None
    if is_img2img:
        img = load_init_image(req.init_image, req.width, req.height)
        r["width"], r["height"] = img.size
        _resolve(model, GenerationRequest(prompt="", width=img.size[0], height=img.size[1]))
        init_pixels = image_to_array(img)
    plan = samplers.make_plan(r["sampler"], model.scheduler_config(), r["steps"], schedule=req.schedule,
                              strength=req.strength if is_img2img else 1.0)
    # an LCM UNet takes the guidance as an embedding: no negative branch (diffusers does the same)
    do_cfg = r["guidance"] > 1.0 and guidance_embedding.embedding_dim(model.manifest) is None
    dims = model.latent_dims(r["width"], r["height"], 1)
    shape = (1, model.manifest.latent_channels, dims["latent_height"], dims["latent_width"])

    images: list[Image.Image] = []
    records: list[dict] = []
    warnings: list[str] = []
    cache: dict[str, Any] = {}
    n_images = len(req.prompts) * req.n_samples
    low_memory = model.config.low_memory
    if low_memory:
        # All prompts first, then the text encoder leaves memory before the UNet comes in.
        for prompt, negative in zip(req.prompts, req.negative_prompts):
            _encode_cached(model, prompt, cache, timer)
            if do_cfg:
                _encode_cached(model, negative, cache, timer)
        model.release("text_encoder")
        model.release("text_encoder_2")
    k = 0
    xl = sdxl.is_sdxl(model)
    for prompt, negative in zip(req.prompts, req.negative_prompts):
        cond = _encode_cached(model, prompt, cache, timer)
        if xl and do_cfg:  # SDXL: an empty negative prompt may mean zeros (cpuflow/pipelines/sdxl.py)
            uncond = sdxl.negative_conditioning(model, negative, cond,
                                                lambda: _encode_cached(model, negative, cache, timer))
        else:
            uncond = _encode_cached(model, negative, cache, timer) if do_cfg else None
        for note, enc in (("prompt", cond), ("negative prompt", uncond)):
            if enc is not None and enc.truncated:
                warnings.append(f"{note} is longer than the text encoder's {model.max_length} tokens; "
                                f"dropped: {enc.dropped_text!r}")
        if xl:
            model_fn = sdxl.guided_model_fn(model, cond, uncond, r["guidance"], dims, timer, r["width"], r["height"])
        else:
            model_fn = guided_model_fn(model, cond.embeddings, None if uncond is None else uncond.embeddings,
                                       r["guidance"], dims, timer)
        for _ in range(req.n_samples):
            seed = (req.seed + k) % (MAX_SEED + 1)
            gen = make_generator(req.rng, seed)
            init_latents = None
            if is_img2img:  # the tiny encoder is deterministic: it draws nothing from gen
                init_latents = encode_taesd(model, init_pixels, timer) if tiny else \
                    encode_image(model, init_pixels, gen, timer)
            noise = gen.randn(shape)
            x = samplers.initial_latents(plan, noise, init_latents)
            cb = _step_callback(progress, k, n_images, plan)
            t0 = time.perf_counter()
            x = denoise(model, plan, model_fn, x, gen, req.eta, callback=cb)
            timer.add("sampling", time.perf_counter() - t0)
            if tiny:
                decoded = decode_taesd(model, x, timer)   # small at any size: no tiling needed
            elif low_memory:
                # One component at a time: the UNet goes before the VAE comes in
                # (with the compiled-model cache, bringing it back is a cache load).
                model.release("unet")
                if max(x.shape[-2:]) > TILE_LATENTS:
                    decoded = decode_tiled(model, x, timer)
                else:
                    decoded = decode_latents(model, x, r["width"], r["height"], timer, warnings)
                model.release("vae_decoder")
            else:
                decoded = decode_latents(model, x, r["width"], r["height"], timer, warnings)
            # finishing step: the invisible watermark (cpuflow/watermark.py; skipped under 256x256)
            img, mark = watermark.apply(array_to_images(decoded)[0], req.watermark)
            images.append(img)
            records.append(dict(_record(model, req, r, prompt, negative, seed, is_img2img, plan), watermark=mark))
            k += 1
    timer.seconds["load_compile"] = model.load_seconds - load_before
    warnings.extend(dict.fromkeys(model.load_warnings))   # each once, for the request that loaded it
    model.load_warnings.clear()
    timer.seconds["total"] = time.perf_counter() - t_start
    unet_calls = plan.n_model_calls * n_images
    if unet_calls:
        timer.seconds["unet_per_call"] = timer.seconds.get("unet", 0.0) / unet_calls
    timer.seconds.pop("sampling", None)
    for rec in records:
        rec["timings"] = {k: round(v, 4) for k, v in timer.seconds.items()}
    return GenerationResult(images, records, dict(timer.seconds), warnings)


def _encode_cached(model, text, cache, timer):
    if text not in cache:
        cache[text] = (sdxl.encode_prompt if sdxl.is_sdxl(model) else encode_prompt)(model, text, timer)
    return cache[text]


def _step_callback(progress: ProgressFn | None, k: int, n_images: int, plan):
    if progress is None:
        return None

    def cb(i, n, x, x0):
        progress({"image": k, "n_images": n_images, "step": i + 1, "n_steps": n, "latents": x, "x0": x0})
    return cb


def _record(model: LoadedModel, req: GenerationRequest, r: dict, prompt: str, negative: str, seed: int,
            is_img2img: bool, plan) -> dict[str, Any]:
    m = model.manifest
    infos = {name: s.info for (name, _), s in model._sessions.items()}
    unet_info = infos.get("unet")
    rec = {
        "task": "img2img" if is_img2img else "txt2img",
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": seed,
        "sampler": r["sampler"],
        "schedule": req.schedule,
        "steps": r["steps"],
        "guidance": r["guidance"],
        "width": r["width"],
        "height": r["height"],
        "rng": req.rng,
        "model_name": m.name,
        "model_hash": m.model_hash,
        "random_weights": m.random_weights,
        "backend": model.config.backend,
        "device": unet_info.device if unet_info else model.config.device,
        "precision": unet_info.precision if unet_info else model.config.precision,
        "variant": {name: getattr(s, "variant", "fp32") for (name, _), s in model._sessions.items()},
        "threads": model.config.threads,
        "decoder": req.decoder,
        "cpuflow_version": __version__,
    }
    if r["sampler"] == "ddim":
        rec["eta"] = req.eta
    if is_img2img:
        rec["strength"] = req.strength
    return rec
