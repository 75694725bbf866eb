"""The tiny autoencoder (TAESD) stages: decode and encode with the folder's
``taesd_decoder`` / ``taesd_encoder`` (added by ``cpuflow export ... --taesd``).

Same arithmetic as diffusers' StableDiffusionPipeline / Img2ImgPipeline built
with ``vae=AutoencoderTiny``: decode ``latents / scaling_factor`` (1.0 for
TAESD; no shift), output in [-1, 1]; encode ``image in [-1, 1]`` to latents
times ``scaling_factor``. The tiny encoder has no distribution to sample, so
img2img draws no encoder noise from the generator (diffusers'
``retrieve_latents`` returns ``.latents`` as they are).
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import InvalidArgument
from ..image import check_finite
from .model import LoadedModel, StageTimer

TAESD_DECODER = "taesd_decoder"
TAESD_ENCODER = "taesd_encoder"
EXPORT_HINT = ("re-export the model with the tiny autoencoder: "
               "`cpuflow export SOURCE OUT_DIR --taesd madebyollin/taesd` (SD 1.x/2.x)")


def has_taesd(model: LoadedModel, component: str = TAESD_DECODER) -> bool:
    return component in model.manifest.components


def require_taesd(model: LoadedModel, *, img2img: bool = False) -> None:
    """The clear error for ``decoder="taesd"`` on a folder without the tiny autoencoder."""
    for comp in (TAESD_DECODER,) + ((TAESD_ENCODER,) if img2img else ()):
        if not has_taesd(model, comp):
            raise InvalidArgument(f"decoder taesd needs the tiny autoencoder, and {model.manifest.root} has no "
                                  f"{comp} (it was exported without --taesd)", hint=EXPORT_HINT)


def _scaling(model: LoadedModel, component: str) -> float:
    return float(model.manifest.components[component].config.get("scaling_factor", 1.0))


def decode_taesd(model: LoadedModel, latents: np.ndarray, timer: StageTimer, *,
                 check: bool = True) -> np.ndarray:
    """UNet latents (1, C, h, w) -> taesd_decoder -> image (1, 3, H, W) in about [-1, 1]."""
    z = np.ascontiguousarray(latents / np.float32(_scaling(model, TAESD_DECODER)), dtype=np.float32)
    d = model.manifest.downscale
    dims = model.latent_dims(z.shape[-1] * d, z.shape[-2] * d, z.shape[0])
    t0 = time.perf_counter()
    out = model.run(TAESD_DECODER, dims, {"latent_sample": z})["sample"]
    timer.add(TAESD_DECODER, time.perf_counter() - t0)
    if check:
        check_finite("taesd decoder output", out)
    return out


def encode_taesd(model: LoadedModel, pixels: np.ndarray, timer: StageTimer) -> np.ndarray:
    """Image (1, 3, H, W) in [-1, 1] -> taesd_encoder -> latents * scaling_factor."""
    _, _, h, w = pixels.shape
    dims = model.latent_dims(w, h, pixels.shape[0])
    t0 = time.perf_counter()
    z = model.run(TAESD_ENCODER, dims, {"sample": np.ascontiguousarray(pixels, dtype=np.float32)})["latents"]
    timer.add(TAESD_ENCODER, time.perf_counter() - t0)
    check_finite("taesd encoder output", z)
    return (z * np.float32(_scaling(model, TAESD_ENCODER))).astype(np.float32)
