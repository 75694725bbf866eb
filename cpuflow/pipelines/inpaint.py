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

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from .. import inpaint_mask as mk
from .. import samplers
from ..errors import InvalidArgument, ModelError
from ..image import _fit, image_to_array, load_init_image
from .model import LoadedModel, StageTimer
from .stages import denoise, encode_image


def uses_inpaint_path(model: LoadedModel, req) -> bool:
    return getattr(req, "mask", None) is not None or model.manifest.unet_kind == "inpaint"


def with_extra_channels(model_fn: Callable, cond: np.ndarray) -> Callable:
    """The UNet's sample is ``[x_in, cond]`` on the channels: conditioning channels (mask and
    masked-image latents, or a depth map) appended after the sampler scaled the latents, as
    diffusers concatenates them after ``scale_model_input``. With guidance, ``model_fn``
    duplicates the whole sample for both branches, as diffusers duplicates cond."""
    cond = np.ascontiguousarray(cond, dtype=np.float32)

    def fn(x_in, t):
        return model_fn(np.concatenate([x_in, cond], axis=1), t)
    return fn


@dataclass
class InpaintJob:
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

    @property
    def masked_pixels(self) -> np.ndarray:
        return self.pixels * (self.mask01 < 0.5)   # diffusers: init_image * (mask_condition < 0.5)

    def sample(self, model: LoadedModel, plan, model_fn: Callable, gen, shape: tuple[int, ...], eta: float,
               callback, timer: StageTimer) -> np.ndarray:
        """One image's latents: the draws, the start, the denoising loop (see the module docstring)."""
        strength_max = self.strength == 1.0
        image_latents = None
        if not self.nine_channels or not strength_max:
            image_latents = encode_image(model, self.pixels, gen, timer)
        noise = np.asarray(gen.randn(shape), dtype=np.float32)
        x = samplers.initial_latents(plan, noise, None if strength_max else image_latents)
        m = mk.latent_mask(self.mask01, shape[-2], shape[-1])
        post_step = None
        if self.nine_channels:
            masked = encode_image(model, self.masked_pixels, gen, timer)
            fn = with_extra_channels(model_fn, np.concatenate([m, masked], axis=1))
        else:
            gen.randn(shape)   # diffusers encodes the masked image here (unused): keep the stream aligned
            fn = model_fn
            keep = np.float32(1.0) - m
            last = plan.n_model_calls - 1

            def post_step(i, x_new):
                known = image_latents if i == last else samplers.noised_latents(plan, image_latents, noise, i + 1)
                return keep * known + m * x_new
        t0 = time.perf_counter()
        x = denoise(model, plan, fn, x, gen, eta, callback=callback, post_step=post_step)
        timer.add("sampling", time.perf_counter() - t0)
        return x

    def finish(self, img: Image.Image) -> Image.Image:
        """"masked" mode: the result pasted back into the original; "whole": as made."""
        if self.box is None:
            return img
        return mk.paste_back(self.paste_mask, self.original, img, self.box)

    def record(self, req) -> dict:
        """What the image record adds for a masked request."""
        if getattr(req, "mask", None) is None:
            return {}
        rec = {"task": "inpaint", "mask_blur": req.mask_blur, "inpaint_area": req.inpaint_area}
        if self.box is not None:
            rec["padding"] = req.padding
            rec["inpaint_box"] = list(self.box)
        return rec


def prepare(model: LoadedModel, req, default_width: int, default_height: int) -> InpaintJob:
    """Read the image and the mask, decide the working size and region. Every input check
    happens here, before any model runs."""
    m = model.manifest
    nine = m.unet_kind == "inpaint"
    if m.unet_kind == "depth":
        raise InvalidArgument("a depth-to-image model does not inpaint; drop --mask or use an inpainting model")
    if "vae_encoder" not in m.components:
        raise ModelError(f"{m.root} has no vae_encoder; inpainting encodes the image with it",
                         hint="re-export the model with a current `cpuflow export`")
    mask_src = getattr(req, "mask", None)
    notes: list[str] = []
    if mask_src is None:   # an inpainting model without a mask: repaint everything
        if req.init_image is None:
            w, h = req.width or default_width, req.height or default_height
            pixels = np.zeros((1, 3, h, w), np.float32)
            strength = 1.0
        else:
            img = load_init_image(req.init_image, req.width, req.height)
            w, h = img.size
            pixels, strength = image_to_array(img), req.strength
        return InpaintJob(pixels, np.ones((1, 1, h, w), np.float32), w, h, nine, strength)
    if req.init_image is None:
        raise InvalidArgument("a mask needs an init image (the picture to repaint)",
                              hint="pass --init-image with --mask")
    area = mk.check_area(req.inpaint_area)
    original = load_init_image(req.init_image)
    mask = mk.load_mask(mask_src)
    mask, note = _mask_to(mask, original.size)
    if note:
        notes.append(note)
    mask = mk.blur(mask, req.mask_blur)
    if area == "whole":
        img = original
        if (req.width or original.width, req.height or original.height) != original.size:
            img = load_init_image(req.init_image, req.width, req.height)
            mask = _fit(mask, *img.size)
        mask01 = mk.binary_mask(mask)
        mk.require_nonempty(mask01)
        w, h = img.size
        return InpaintJob(image_to_array(img), mask01, w, h, nine, req.strength, notes=notes)
    w, h = req.width or default_width, req.height or default_height
    mk.require_nonempty(mk.binary_mask(mask))
    box = mk.crop_region(mask, w, h, req.padding)
    work = mk.crop_to_work(original, box, w, h)
    work_mask = mk.crop_to_work(mask, box, w, h).convert("L")
    return InpaintJob(image_to_array(work), mk.binary_mask(work_mask), w, h, nine, req.strength,
                      original=original, paste_mask=mask, box=box, notes=notes)


def _mask_to(mask: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str | None]:
    """The mask at the image's size. load_init_image rounds an image down to a multiple of 8
    by a centred crop; a mask of the image's own (unrounded) size gets the same crop, anything
    else is resized (and the caller says so)."""
    (mw, mh), (w, h) = mask.size, size
    if 0 <= mw - w < 8 and 0 <= mh - h < 8:
        left, top = (mw - w) // 2, (mh - h) // 2
        return mask.crop((left, top, left + w, top + h)), None
    return mk.fit_mask(mask, size)
