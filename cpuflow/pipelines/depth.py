"""Depth-to-image: img2img that keeps the shape of the scene.

Mirrors diffusers' StableDiffusionDepth2ImgPipeline (the parity tests hold us to
50 dB against it): the depth map (estimated by the exported DPT
``depth_estimator``, or given by the user) becomes one more UNet input channel,
resized to the latent grid and scaled to [-1, 1] (cpuflow/depth_map.py) and
concatenated after the sampler scaled the latents; the rest is img2img (the
image's latents drawn from the generator, then the noise, started at the
strength's timestep). A depth model needs an init image (as diffusers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from .. import depth_map as dm
from .. import samplers
from ..errors import InvalidArgument, ModelError
from ..image import image_to_array, load_init_image
from .inpaint import with_extra_channels
from .model import LoadedModel, StageTimer
from .stages import denoise, encode_image

COMPONENT = "depth_estimator"


def uses_depth_path(model: LoadedModel, req) -> bool:
    return model.manifest.unet_kind == "depth" or getattr(req, "depth_map", None) is not None


@dataclass
class DepthJob:
    pixels: np.ndarray            # (1, 3, H, W) in [-1, 1]
    depth: np.ndarray             # (1, h, w): raw depth (estimated or given)
    width: int
    height: int
    strength: float
    given: bool
    notes: list[str] = field(default_factory=list)

    def sample(self, model: LoadedModel, plan, model_fn: Callable, gen, shape: tuple[int, ...], eta: float,
               callback, timer: StageTimer) -> np.ndarray:
        cond = dm.depth_condition(self.depth, shape[-2], shape[-1])
        init_latents = encode_image(model, self.pixels, gen, timer)
        noise = gen.randn(shape)
        x = samplers.initial_latents(plan, noise, init_latents)
        t0 = time.perf_counter()
        x = denoise(model, plan, with_extra_channels(model_fn, cond), x, gen, eta, callback=callback)
        timer.add("sampling", time.perf_counter() - t0)
        return x

    def finish(self, img: Image.Image) -> Image.Image:
        return img

    def record(self, req) -> dict:
        return {"task": "depth2img", "depth_map": "given" if self.given else "estimated"}

    def depth_image(self) -> Image.Image:
        """The depth map at the picture's size (--save-depth)."""
        return dm.depth_image(self.depth, self.width, self.height)


def prepare(model: LoadedModel, req, timer: StageTimer) -> DepthJob:
    """Read the image and the depth map (or estimate it); all input checks before sampling."""
    m = model.manifest
    if m.unet_kind != "depth":
        raise InvalidArgument("a depth map needs a depth-to-image model (e.g. stable-diffusion-2-depth); "
                              f"{m.name} is a {m.unet_kind} model")
    if getattr(req, "mask", None) is not None:
        raise InvalidArgument("a depth-to-image model does not inpaint; drop --mask or use an inpainting model")
    if req.init_image is None:
        raise InvalidArgument("a depth-to-image model needs an init image (its depth is what is kept)",
                              hint="pass --init-image")
    if "vae_encoder" not in m.components:
        raise ModelError(f"{m.root} has no vae_encoder; depth-to-image encodes the image with it",
                         hint="re-export the model with a current `cpuflow export`")
    img = load_init_image(req.init_image, req.width, req.height)
    if req.depth_map is not None:
        depth, given = dm.load_depth_map(req.depth_map), True
    else:
        depth, given = estimate(model, img, timer), False
    return DepthJob(image_to_array(img), depth, img.width, img.height, req.strength, given)


def estimate(model: LoadedModel, img: Image.Image, timer: StageTimer) -> np.ndarray:
    """The DPT depth estimator on ``img``: (1, h, w) float32 (larger = nearer)."""
    m = model.manifest
    pre = (m.raw.get("depth") or {}).get("preprocess")
    if COMPONENT not in m.components or not isinstance(pre, dict):
        raise ModelError(f"{m.root} has no depth estimator; pass a depth map (--depth-map) or re-export the model",
                         hint="re-export the model with a current `cpuflow export`")
    x = dm.estimator_input(img, pre)
    t0 = time.perf_counter()
    out = model.run(COMPONENT, {"batch": 1}, {"pixel_values": x})["predicted_depth"]
    timer.add(COMPONENT, time.perf_counter() - t0)
    from ..image import check_finite
    check_finite("depth estimator output", out)
    return np.ascontiguousarray(out, dtype=np.float32)
