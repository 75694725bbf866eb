"""The stages every task shares: encode the prompt, denoise, decode, encode an image.

Each stage mirrors what diffusers' StableDiffusionPipeline does on the same
weights (the parity tests hold us to 50 dB against it), but runs on a backend
session instead of torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import guidance_embedding, samplers
from ..errors import ModelError
from ..image import check_finite
from ..prompt_encoding import EncodedPrompt, PromptOptions, encode_text, encoders_of, text_length_dims
from .deep_cache import unet_call
from .model import LoadedModel, StageTimer


def encode_prompt(model: LoadedModel, text: str, timer: StageTimer,
                  options: PromptOptions | None = None) -> EncodedPrompt:
    """The prompt through the model's text encoder(s), A1111's way: weights,
    BREAK, 77-token chunks, clip skip, textual-inversion words
    (cpuflow/prompt_encoding.py; SDXL: both encoders and the pooled embeds)."""
    return encode_text(model, encoders_of(model), text, options or PromptOptions(), timer)


def rescale_guided(guided: np.ndarray, cond: np.ndarray, rescale: float) -> np.ndarray:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", eq. 15-16; diffusers' ``rescale_noise_cfg``): scale
    the guided output to the standard deviation of the conditional one, per image
    over (C, H, W), then mix ``rescale`` of that with ``1 - rescale`` of the
    guided output. It undoes the over-exposure that strong guidance gives models
    trained with zero terminal SNR. torch's ``std`` is unbiased: ddof=1."""
    axes = tuple(range(1, guided.ndim))
    std_cond = cond.std(axis=axes, keepdims=True, ddof=1, dtype=np.float64)
    std_guided = guided.std(axis=axes, keepdims=True, ddof=1, dtype=np.float64)
    rescaled = guided * (std_cond / std_guided)
    return (rescale * rescaled + (1.0 - rescale) * guided).astype(np.float32)


def guided_model_fn(model: LoadedModel, cond: np.ndarray, uncond: np.ndarray | None, guidance: float,
                    latent_dims: dict, timer: StageTimer, *, cond_extra: dict | None = None,
                    uncond_extra: dict | None = None, concat: np.ndarray | None = None,
                    guidance_rescale: float = 0.0, deep_cache: int | None = None,
                    split_cfg: bool = False) -> Callable[[np.ndarray, float], np.ndarray]:
    """The UNet with classifier-free guidance (Ho & Salimans 2022):
    out = uncond + g * (cond - uncond), on the raw output (epsilon or v), with
    the batch ordered [uncond, cond] as diffusers does. Without guidance
    (uncond None) the UNet runs once per step at batch 1: half the work.
    A UNet that takes the guidance as an embedding (LCM, cpuflow/guidance_embedding.py)
    gets it there and never runs an unconditional branch, as in diffusers.
    ``cond_extra`` / ``uncond_extra``: more per-branch UNet inputs, batched the same
    way (SDXL's pooled ``text_embeds`` and ``time_ids``). ``concat``: extra input
    channels (1, C, h, w) appended to the scaled latents on every call, the same
    for both branches (inpainting's mask + masked-image latents, depth, the
    upscaler's low-res image), as diffusers concatenates them after
    ``scale_model_input``. ``guidance_rescale`` > 0: :func:`rescale_guided` on the
    guided output (only where there is an unconditional branch, as in diffusers).
    ``deep_cache`` N > 1: DeepCache, the full UNet every N calls of this function and
    the shallow branch in between (pipelines/deep_cache.py; make one function per
    image: the cache starts empty).
    ``split_cfg``: run the two branches as two batch-1 UNet calls instead of one
    batch-2 call (``--low-memory``): the same arithmetic per sample, half the
    activation memory at the UNet's peak (each branch keeps its own DeepCache
    features)."""
    cond_extra, uncond_extra = dict(cond_extra or {}), dict(uncond_extra or {})
    extra = {}
    emb_dim = guidance_embedding.embedding_dim(model.manifest)
    if emb_dim is not None:
        uncond = None
        extra[guidance_embedding.INPUT_NAME] = guidance_embedding.guidance_embedding(guidance, emb_dim)
    batch = 1 if uncond is None else 2
    split = split_cfg and batch == 2
    dims = dict(latent_dims, batch=1 if split else batch, **text_length_dims(model, cond.shape[1]))
    ehs = cond if uncond is None else np.concatenate([uncond, cond], axis=0)
    for name, c in cond_extra.items():
        extra[name] = c if uncond is None else np.concatenate([uncond_extra[name], c], axis=0)
    calls = [0]
    if split:   # [uncond, cond]: one UNet function per branch, each fed its half of the batch
        branches = [unet_call(model, dims, deep_cache) for _ in range(2)]

        def unet(feeds: dict) -> np.ndarray:
            return np.concatenate([f({k: v[i:i + 1] for k, v in feeds.items()}) for i, f in enumerate(branches)],
                                  axis=0)
    else:
        unet = unet_call(model, dims, deep_cache)
    if concat is not None:
        concat = np.asarray(concat, dtype=np.float32)

    def fn(x: np.ndarray, t: float) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if concat is not None:
            x = np.concatenate([x, concat], axis=1)
        inp = x if batch == 1 else np.concatenate([x, x], axis=0)
        ts = np.full((batch,), t, dtype=np.float32)
        t0 = time.perf_counter()
        out = unet({"sample": inp, "timestep": ts, "encoder_hidden_states": ehs, **extra})
        timer.add("unet", time.perf_counter() - t0)
        calls[0] += 1
        check_finite(f"unet output (call {calls[0]}, timestep {t:g})", out)
        if batch == 1:
            return out
        u, c = out[0:1], out[1:2]
        guided = u + np.float32(guidance) * (c - u)
        return rescale_guided(guided, c, guidance_rescale) if guidance_rescale > 0 else guided

    return fn


def denoise(model: LoadedModel, plan, model_fn, x: np.ndarray, generator, eta: float,
            callback=None, post_step=None) -> np.ndarray:
    x = samplers.sample(plan, model_fn, x, generator=generator, eta=eta, callback=callback, post_step=post_step)
    check_finite("latents after sampling", x)
    return x


def decode_latents(model: LoadedModel, latents: np.ndarray, width: int, height: int,
                   timer: StageTimer, warnings: list[str] | None = None) -> np.ndarray:
    """latents / scaling_factor (+ shift) -> VAE decoder -> image in [-1, 1].
    A non-finite result from a reduced-precision run is retried once in f32
    (the VAE decoder is the stage most prone to bf16/fp16 overflow); if that
    fails too, it is a NumericalError, never a black image."""
    m = model.manifest
    z = latents / np.float32(m.scaling_factor)
    if m.shift_factor is not None:
        z = z + np.float32(m.shift_factor)
    z = np.ascontiguousarray(z, dtype=np.float32)
    dims = model.latent_dims(width, height, 1)
    t0 = time.perf_counter()
    out = model.run("vae_decoder", dims, {"latent_sample": z})["sample"]
    timer.add("vae_decoder", time.perf_counter() - t0)
    if not np.isfinite(out).all():
        sess = model.session("vae_decoder", dims)
        if getattr(sess.info, "precision", "f32") != "f32":
            out = _decode_f32(model, z, dims, timer)
            if warnings is not None and np.isfinite(out).all():
                warnings.append(f"the VAE decoder overflowed in {sess.info.precision}; "
                                "this image was decoded again in full precision (f32)")
    check_finite("vae decoder output", out)
    return out


TILE_LATENTS = 64     # 512 px tiles for the VAE decoder in low-memory mode
TILE_OVERLAP = 16     # latents shared by neighbouring tiles, blended linearly


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    w = np.ones(n, dtype=np.float32)
    if overlap > 0:
        r = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if not first:
            w[:overlap] = r
        if not last:
            w[-overlap:] = r[::-1]
    return w


def decode_tiled(model: LoadedModel, latents: np.ndarray, timer: StageTimer, *,
                 tile: int = TILE_LATENTS, overlap: int = TILE_OVERLAP) -> np.ndarray:
    """Decode large latents in overlapping tiles (low-memory mode): the VAE
    decoder's activations grow with the image (about 2.5 GB at 1024x1024 for
    SD); tiles bound them to one tile's worth. Tiles are blended with linear
    ramps over the overlap. Like diffusers' tiled VAE, the result differs
    slightly from a whole decode (the decoder's GroupNorm sees one tile)."""
    m = model.manifest
    z = latents / np.float32(m.scaling_factor)
    if m.shift_factor is not None:
        z = z + np.float32(m.shift_factor)
    _, _, lh, lw = z.shape
    th, tw = min(tile, lh), min(tile, lw)
    f = m.downscale
    out = np.zeros((1, 3, lh * f, lw * f), dtype=np.float32)
    weight = np.zeros((1, 1, lh * f, lw * f), dtype=np.float32)
    dims = model.latent_dims(tw * f, th * f, 1)
    ys, xs = _tile_starts(lh, th, overlap), _tile_starts(lw, tw, overlap)
    for y in ys:
        for x in xs:
            t0 = time.perf_counter()
            part = model.run("vae_decoder", dims,
                             {"latent_sample": np.ascontiguousarray(z[:, :, y:y + th, x:x + tw])})["sample"]
            timer.add("vae_decoder", time.perf_counter() - t0)
            check_finite("vae decoder output (tile)", part)
            wy = _ramp(th * f, overlap * f, y == ys[0], y == ys[-1])
            wx = _ramp(tw * f, overlap * f, x == xs[0], x == xs[-1])
            w = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += part * w
            weight[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += w
    return out / weight


def _decode_f32(model: LoadedModel, z: np.ndarray, dims: dict, timer: StageTimer) -> np.ndarray:
    from dataclasses import replace
    from ..backends.base import get_backend
    backend = get_backend(model.config.backend, replace(model.options, precision="f32"))
    comp = model.manifest.components["vae_decoder"]
    var = comp.variants["fp32"]
    t0 = time.perf_counter()
    sess = backend.load("vae_decoder", model.manifest.path(var.model_file(model.format)), comp.inputs,
                        comp.outputs, static_dims=dims, cache_key=f"{model.manifest.model_hash}-vae_decoder-fp32")
    try:
        out = sess.run({"latent_sample": z})["sample"]
    finally:
        sess.close()
    timer.add("vae_decoder", time.perf_counter() - t0)
    return out


@dataclass(frozen=True)
class EncodedImage:
    """An init image through the VAE encoder: the latent distribution's mean and
    standard deviation (a tiny autoencoder: std None, its latents are exact).
    Encoded once per request; each image of the request draws its own sample."""
    mean: np.ndarray
    std: np.ndarray | None

    def sample(self, model: LoadedModel, generator) -> np.ndarray:
        """diffusers' ``retrieve_latents``: DiagonalGaussianDistribution(parameters).sample(generator)
        = mean + std * randn(mean.shape), drawn from the same generator the sampler uses
        afterwards, then times the scaling factor (minus the shift first, where a model
        has one). The tiny encoder draws nothing (its latents are returned as they are)."""
        if self.std is None:
            return self.mean
        m = model.manifest
        z = self.mean + self.std * generator.randn(self.mean.shape)
        if m.shift_factor is not None:
            z = z - np.float32(m.shift_factor)
        return (z * np.float32(m.scaling_factor)).astype(np.float32)


def encode_image(model: LoadedModel, pixels: np.ndarray, timer: StageTimer) -> EncodedImage:
    """Image (1, 3, H, W) in [-1, 1] -> VAE encoder -> the latent distribution
    (mean, exp(0.5 * clamp(logvar, -30, 20))), as diffusers' DiagonalGaussianDistribution."""
    m = model.manifest
    if "vae_encoder" not in m.components:
        raise ModelError(f"{m.root} has no vae_encoder, and starting from an image needs one",
                         hint="re-export the model with a current cpuflow")
    _, _, h, w = pixels.shape
    dims = model.latent_dims(w, h, 1)
    t0 = time.perf_counter()
    params = model.run("vae_encoder", dims, {"sample": np.ascontiguousarray(pixels, dtype=np.float32)})
    timer.add("vae_encoder", time.perf_counter() - t0)
    p = params["latent_parameters"]
    check_finite("vae encoder output", p)
    mean, logvar = np.split(p, 2, axis=1)
    logvar = np.clip(logvar, -30.0, 20.0)
    return EncodedImage(mean, np.exp(0.5 * logvar))
