"""The x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): a low-res image in, 4x the size out.

What diffusers' ``StableDiffusionUpscalePipeline.__call__`` does, on the shared stages:

1. the prompt and (with guidance > 1) the negative prompt through the text encoder;
2. the image in [-1, 1] is noised by the *low-res* scheduler (a DDPM schedule) at
   ``noise_level``: ``sqrt(a) x + sqrt(1 - a) n`` (DDPMScheduler.add_noise), with ``n`` drawn
   from the seed's generator FIRST, then the initial latents (the input's size, 4 channels),
   times the sampler's init_noise_sigma: the same draws in the same order as diffusers;
3. every UNet call gets ``concat([scaled latents, noised image], channels)`` (7 channels) and
   the noise level as ``class_labels``; classifier-free guidance batches [uncond, cond] as
   diffusers does (both branches get the same image and noise level);
4. latents / 0.08333 -> VAE decoder -> 4x the input size.

Tiles (``tile``): the UNet runs on overlapping latent windows of at most tile x tile and its
outputs are blended with linear ramps over the overlap at every call (so each sampler step
sees one seamless prediction of the whole image: MultiDiffusion, Bar-Tal et al. 2023, eq. 3
with ramp weights); the VAE decodes the final latents in tiles too (stages.decode_tiled). Only
one tile's activations are alive at a time, so memory stays bounded whatever the input size.
One window covering the image is exactly the untiled computation (weights 1, no blending).
"""
from __future__ import annotations

import numpy as np

from .. import samplers
from ..config import MAX_UPSCALE_INPUT_PIXELS, UpscaleRequest
from ..errors import InvalidArgument
from ..image import array_to_images, image_to_array, load_init_image
from ..manifest import UPSCALER_FAMILY
from ..schedules import NoiseSchedule
from .model import LoadedModel, StageTimer
from .run import GenerationResult, ImageFn, ImageJob, ProgressFn, Run
from .stages import _ramp, _tile_starts, decode_tiled, guided_model_fn

DEFAULT_NOISE_LEVEL = 20      # StableDiffusionUpscalePipeline.__call__'s default
# Automatic tiles: inputs up to AUTO_TILE pixels a side (the model's own 128 -> 512, where the
# full-size UNet and VAE fit in a few GB) run in one piece; larger ones in tiles of AUTO_TILE.
AUTO_TILE = 128
VAE_OVERLAP = 16              # latent pixels shared by VAE tiles, at most (the decoder's receptive field is small)


def unet_overlap(tile: int) -> int:
    """Latent pixels shared by neighbouring UNet tiles: a quarter of a tile (32 for 128)."""
    return tile // 4


def is_upscaler(model: LoadedModel) -> bool:
    return model.manifest.family == UPSCALER_FAMILY


def require_upscaler(model: LoadedModel) -> None:
    if not is_upscaler(model):
        raise InvalidArgument(f"{model.manifest.root} is a {model.manifest.family} text-to-image model, not an x4 "
                              "upscaler: export stabilityai/stable-diffusion-x4-upscaler and pass that folder")


def refuse_upscaler(model: LoadedModel) -> None:
    """generate() on an upscaler folder: one clear line instead of a shape error."""
    if is_upscaler(model):
        raise InvalidArgument(f"{model.manifest.root} is an x4 upscaler, not a text-to-image model: use "
                              f"`cpuflow upscale --model {model.manifest.root} IMAGE` (or generate --upscale)")


def low_res_noise(scheduler_config: dict, image: np.ndarray, noise: np.ndarray, noise_level: int) -> np.ndarray:
    """DDPMScheduler.add_noise of the low-res scheduler, float32 as diffusers:
    ``alphas_cumprod[t] ** 0.5 * x + (1 - alphas_cumprod[t]) ** 0.5 * n`` (Ho et al. 2020, eq. 4)."""
    a = np.float32(NoiseSchedule.from_config(scheduler_config).alphas_cumprod_f32[int(noise_level)])
    sa = np.float32(a ** np.float32(0.5))
    sb = np.float32((np.float32(1.0) - a) ** np.float32(0.5))
    return sa * image + sb * noise


def choose_tile(asked: int | None, height: int, width: int) -> tuple[int | None, str]:
    """(tile in latent pixels or None for one piece, the sentence that says why)."""
    side = max(height, width)
    if asked is not None:
        if asked >= side:
            return None, f"--tile {asked} covers the whole {width}x{height} input: one piece"
        return asked, f"tiles of {asked}x{asked} (--tile)"
    if side <= AUTO_TILE:
        return None, f"one piece (automatic: inputs up to {AUTO_TILE} px a side are not tiled)"
    return AUTO_TILE, (f"tiles of {AUTO_TILE}x{AUTO_TILE} input pixels (automatic above {AUTO_TILE} px a side, "
                       "to bound memory; --tile N to choose)")


def _windows(height: int, width: int, tile: int | None, overlap: int):
    """[(y, x, th, tw, weight (th, tw))] covering the image; one full window without tiles."""
    if tile is None:
        return [(0, 0, height, width, None)]
    th, tw = min(tile, height), min(tile, width)
    ys, xs = _tile_starts(height, th, overlap), _tile_starts(width, tw, overlap)
    out = []
    for y in ys:
        for x in xs:
            wgt = (_ramp(th, overlap, y == ys[0], y == ys[-1])[:, None]
                   * _ramp(tw, overlap, x == xs[0], x == xs[-1])[None, :])
            out.append((y, x, th, tw, wgt))
    return out


def upscale_model_fn(model: LoadedModel, cond: np.ndarray, uncond: np.ndarray | None, guidance: float,
                     low_res: np.ndarray, noise_level: int, tile: int | None, timer: StageTimer):
    """model_fn(x_in, t) for the sampler: the guided UNet (stages.guided_model_fn: the noised
    image concatenated after the scaled latents, the noise level as class_labels) per window,
    the windows' outputs blended. One window: exactly the untiled computation."""
    _, _, h, w = low_res.shape
    windows = _windows(h, w, tile, unet_overlap(tile) if tile else 0)
    th, tw = windows[0][2], windows[0][3]
    labels = {"class_labels": np.array([noise_level], dtype=np.int64)}

    def guided(win):
        return guided_model_fn(model, cond, uncond, guidance, {"latent_height": th, "latent_width": tw}, timer,
                               cond_extra=labels, uncond_extra=labels, concat=np.ascontiguousarray(low_res[win]))

    if windows[0][4] is None:
        return guided((slice(None),) * 4)
    parts = []
    total = np.zeros((h, w), dtype=np.float32)
    for y, x, _, _, wgt in windows:
        win = (slice(None), slice(None), slice(y, y + th), slice(x, x + tw))
        parts.append((win, wgt, guided(win)))
        total[win[2:]] += wgt

    def fn(x: np.ndarray, t: float) -> np.ndarray:
        out = np.zeros(x.shape, dtype=np.float32)
        for win, wgt, unet in parts:   # one window's activations alive at a time
            out[win] += unet(np.ascontiguousarray(x[win]), t) * wgt
        return out / total

    return fn


def _noise_level(model: LoadedModel, req: UpscaleRequest) -> int:
    up = model.manifest.raw["upscaler"]
    level = req.noise_level if req.noise_level is not None else int(up.get("default_noise_level",
                                                                            DEFAULT_NOISE_LEVEL))
    max_level = int(up["max_noise_level"])
    if not 0 <= level <= max_level:
        raise InvalidArgument(f"noise_level must be between 0 and {max_level} for this model, got {level}")
    return level


def upscale(model: LoadedModel, req: UpscaleRequest, progress: ProgressFn | None = None,
            on_image: ImageFn | None = None) -> GenerationResult:
    require_upscaler(model)
    noise_level = _noise_level(model, req)
    up = model.manifest.raw["upscaler"]
    img = load_init_image(req.image, max_pixels=MAX_UPSCALE_INPUT_PIXELS, what="image to upscale")
    w, h = img.size
    pixels = image_to_array(img)
    run = Run(model, req.generation, "upscale", progress, on_image)
    run.set_size(w * int(up["factor"]), h * int(up["factor"]))   # the latents have the input's size
    run.make_plan()
    tile, tile_why = choose_tile(req.tile, h, w)
    run.record_extra.update(noise_level=noise_level, input_width=w, input_height=h, tile=tile or 0,
                            tile_choice=tile_why)
    for job in run.jobs():
        x = sample_upscaled(run, job, pixels, noise_level, tile)
        if tile is None:
            run.finish_image(job, x)
        else:
            decoded = decode_tiled(model, x, run.timer, tile=tile, overlap=min(VAE_OVERLAP, tile // 4))
            run.emit(array_to_images(decoded)[0], run.record(job))
    return run.result()


def sample_upscaled(run: Run, job: ImageJob, pixels: np.ndarray, noise_level: int, tile: int | None) -> np.ndarray:
    """One image's final latents, not decoded: ``pixels`` (1, 3, h, w) in [-1, 1] noised by
    the low-res scheduler at ``noise_level``, then the initial latents (the input's size),
    denoised by the guided UNet over both. diffusers draws the image's noise first, then
    the latents, from the same generator. The calibration of int8 / hybrid
    (export/calibrate.py) samples through here too."""
    up = run.model.manifest.raw["upscaler"]
    low_res = low_res_noise(up["low_res_scheduler"], pixels, job.noise(pixels.shape), noise_level)
    x = samplers.initial_latents(run.plan, job.noise(run.latent_shape()))
    c = job.conditioning
    job.model_fn = upscale_model_fn(run.model, c.cond.embeddings, None if c.uncond is None else c.uncond.embeddings,
                                    run.params["guidance"], low_res, noise_level, tile, run.timer)
    return run.sample(job, x)
