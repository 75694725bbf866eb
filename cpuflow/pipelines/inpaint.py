"""Inpainting: repaint the white part of a mask, keep the rest.

Mirrors diffusers' StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline
(the parity tests hold us to 50 dB against both) for the two kinds of UNet:

* an inpainting UNet (manifest ``unet_kind`` "inpaint", 2C+1 input channels): at
  every call the UNet gets ``[latents, mask, masked_image_latents]`` on the
  channels, concatenated AFTER the sampler scaled the latents
  (``scale_model_input``), so the mask and the masked image are never scaled;
* an ordinary UNet (C channels): after every sampler step the known region is put
  back, ``x = (1 - m) * add_noise(image_latents, noise, t_next) + m * x`` (no noise
  after the last step), through the sampler's post-step hook.

Generator draws, in diffusers' order: the image's latents (only for a C-channel
UNet or strength < 1), the initial noise, then the masked image's latents (always
drawn: a C-channel UNet does not use them, so only the generator advances).
At strength 1 the loop starts from pure noise (``is_strength_max``), else from the
image's latents noised to the first timestep.

An inpainting model asked for txt2img / img2img (no mask) runs as diffusers'
inpainting pipeline does with an all-white mask: everything is repainted (txt2img:
from a mid-grey image, which only enters through the masked image, all zeros).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .. import inpaint_mask as mk
from .. import samplers
from ..config import GenerationRequest
from ..errors import InvalidArgument, ModelError
from ..image import image_to_array, load_init_image
from . import init_image
from .model import LoadedModel
from .run import GenerationResult, ImageFn, ProgressFn, Run
from .stages import encode_image


def inpaint(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
            on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    masked = req.mask is not None
    task = "inpaint" if masked else "img2img" if req.init_image is not None else "txt2img"
    run = Run(model, req, task, progress, on_image, keep_images=keep_images)
    spec = prepare(model, run.req, run.width, run.height)
    run.set_size(spec.width, spec.height)
    for note in spec.notes:
        run.warn(note)
    plan = run.make_plan(strength=spec.strength)
    if run.req.init_image is not None:
        run.record_extra["strength"] = spec.strength
    run.record_extra.update(spec.record(run.req))
    if spec.box is not None:
        run.finish_hook = spec.finish
    # Encoded once per request; each image draws its own samples from them (stages.EncodedImage).
    strength_max = spec.strength == 1.0
    image = encode_image(model, spec.pixels, run.timer) if not spec.nine_channels or not strength_max else None
    masked_image = encode_image(model, spec.masked_pixels, run.timer) if spec.nine_channels else None
    shape = run.latent_shape()
    m = mk.latent_mask(spec.mask01, shape[-2], shape[-1])
    for job in run.jobs():
        image_latents = image.sample(model, job.generator) if image is not None else None
        noise = job.noise(shape)
        x = samplers.initial_latents(plan, noise, None if strength_max else image_latents)
        post_step = None
        if spec.nine_channels:
            cond = np.concatenate([m, masked_image.sample(model, job.generator)], axis=1)
            job.model_fn = run.guided(job.conditioning, concat=cond)
        else:
            job.generator.randn(shape)   # diffusers encodes the masked image here (unused): keep the stream aligned
            post_step = _blend(plan, m, image_latents, noise)
        run.finish_image(job, run.sample(job, x, post_step=post_step))
    return run.result()


def _blend(plan, m: np.ndarray, image_latents: np.ndarray, noise: np.ndarray):
    """A 4-channel UNet: after call i the known region is the image's latents noised to the
    next call's level (none after the last), ``(1 - m) * known + m * x`` (diffusers)."""
    keep = np.float32(1.0) - m
    last = plan.n_model_calls - 1

    def post_step(i: int, x: np.ndarray) -> np.ndarray:
        known = image_latents if i == last else samplers.noised_latents(plan, image_latents, noise, i + 1)
        return keep * known + m * x
    return post_step


@dataclass
class InpaintSpec:
    """What a request asks, read and checked: the picture and the mask at the working size."""
    pixels: np.ndarray                  # (1, 3, H, W) in [-1, 1]: the image at the working size
    mask01: np.ndarray                  # (1, 1, H, W) binary: 1 = repaint
    width: int                          # working size (the model's in "masked" mode)
    height: int
    nine_channels: bool
    strength: float
    original: Image.Image | None = None  # "masked" mode: what the result is pasted back into
    paste_mask: Image.Image | None = None
    box: tuple[int, int, int, int] | None = None
    notes: list[str] = field(default_factory=list)
    init: init_image.InitImage | None = None   # "whole" and no mask: the photo and its working size

    @property
    def masked_pixels(self) -> np.ndarray:
        return self.pixels * (self.mask01 < 0.5)   # diffusers: init_image * (mask_condition < 0.5)

    def finish(self, img: Image.Image) -> Image.Image:
        """"masked" mode: the result pasted back into the original."""
        return mk.paste_back(self.paste_mask, self.original, img, self.box)

    def record(self, req) -> dict:
        """What the image record adds: the init image's size and resize mode, and the mask's settings."""
        rec = self.init.record() if self.init is not None else {}
        if req.mask is None:
            return rec
        rec.update(mask_blur=req.mask_blur, inpaint_area=req.inpaint_area)
        if self.box is not None:
            rec["padding"] = req.padding
            rec["inpaint_box"] = list(self.box)
        return rec


def prepare(model: LoadedModel, req, default_width: int, default_height: int) -> InpaintSpec:
    """Read the image and the mask, decide the working size and region. Every input check
    happens here, before any model runs."""
    m = model.manifest
    nine = m.unet_kind == "inpaint"
    if m.unet_kind == "depth":
        raise InvalidArgument("a depth-to-image model does not inpaint; drop --mask or use an inpainting model")
    if "vae_encoder" not in m.components:
        raise ModelError(f"{m.root} has no vae_encoder; inpainting encodes the image with it",
                         hint="re-export the model with a current `cpuflow export`")
    if req.mask is None:   # an inpainting model without a mask: repaint everything
        if req.init_image is None:
            w, h = req.width or default_width, req.height or default_height
            pixels = np.zeros((1, 3, h, w), np.float32)
            strength = 1.0
            init = None
        else:
            init = init_image.load(model, req)
            (w, h), pixels, strength = init.size, image_to_array(init.sized()), req.strength
        return InpaintSpec(pixels, np.ones((1, 1, h, w), np.float32), w, h, nine, strength, init=init)
    area = mk.check_area(req.inpaint_area)
    if area == "whole":
        # The mask is laid on the photo at the photo's size and blurred there, then both go to
        # the working size through the same resize (init_image.py), so it stays on the picture.
        init = init_image.load(model, req)
        mask, note = mk.fit_mask(mk.load_mask(req.mask), init.photo.size)
        mask01 = mk.binary_mask(init.sized(mk.blur(mask, req.mask_blur)))
        mk.require_nonempty(mask01)
        return InpaintSpec(image_to_array(init.sized()), mask01, *init.size, nine, req.strength,
                           notes=[note] if note else [], init=init)
    original = load_init_image(req.init_image)
    mask = mk.load_mask(req.mask)
    mask, note = _mask_to(mask, original.size)
    notes = [note] if note else []
    mask = mk.blur(mask, req.mask_blur)
    w, h = req.width or default_width, req.height or default_height
    mk.require_nonempty(mk.binary_mask(mask))
    box = mk.crop_region(mask, w, h, req.padding)
    work = mk.crop_to_work(original, box, w, h)
    work_mask = mk.crop_to_work(mask, box, w, h).convert("L")
    return InpaintSpec(image_to_array(work), mk.binary_mask(work_mask), w, h, nine, req.strength,
                       original=original, paste_mask=mask, box=box, notes=notes)


def _mask_to(mask: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
    """"Only masked": the mask at the picture's size. load_init_image rounds an image down to a
    multiple of 8 by a centred crop; a mask of the image's own (unrounded) size gets the same
    crop, anything else is resized (and the caller says so)."""
    (mw, mh), (w, h) = mask.size, size
    if 0 <= mw - w < 8 and 0 <= mh - h < 8:
        left, top = (mw - w) // 2, (mh - h) // 2
        return mask.crop((left, top, left + w, top + h)), None
    return mk.fit_mask(mask, size)
