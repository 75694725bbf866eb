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

import numpy as np
from PIL import Image

from .. import depth_map as dm
from .. import samplers
from ..config import GenerationRequest
from ..errors import InvalidArgument, ModelError
from ..image import check_finite, image_to_array
from . import init_image
from .model import LoadedModel, StageTimer
from .run import GenerationResult, ImageFn, ProgressFn, Run
from .stages import encode_image

COMPONENT = "depth_estimator"


def depth2img(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
              on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    check_request(model, req)
    run = Run(model, req, "depth2img", progress, on_image, keep_images=keep_images)
    img = init_image.load_for(run)
    given = run.req.depth_map is not None
    depth = dm.load_depth_map(run.req.depth_map) if given else estimate(model, img, run.timer)
    shape = run.latent_shape()
    cond = dm.depth_condition(depth, shape[-2], shape[-1])
    plan = run.make_plan(strength=run.req.strength)
    run.record_extra.update(strength=run.req.strength, depth_map="given" if given else "estimated")
    run.extras["depth_map"] = dm.depth_image(depth, img.width, img.height)
    init = encode_image(model, image_to_array(img), run.timer)
    for job in run.jobs(concat=cond):
        noise_free = init.sample(model, job.generator)   # the encoder's draw comes first, as in diffusers
        x = samplers.initial_latents(plan, job.noise(shape), noise_free)
        run.finish_image(job, run.sample(job, x))
    return run.result()


def check_request(model: LoadedModel, req: GenerationRequest) -> None:
    m = model.manifest
    if m.unet_kind != "depth":
        raise InvalidArgument("a depth map needs a depth-to-image model (e.g. stable-diffusion-2-depth); "
                              f"{m.name} is a {m.unet_kind} model")
    if req.init_image is None:
        raise InvalidArgument("a depth-to-image model needs an init image (its depth is what is kept)",
                              hint="pass --init-image")
    if "vae_encoder" not in m.components:
        raise ModelError(f"{m.root} has no vae_encoder; depth-to-image encodes the image with it",
                         hint="re-export the model with a current `cpuflow export`")


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
    check_finite("depth estimator output", out)
    return np.ascontiguousarray(out, dtype=np.float32)
