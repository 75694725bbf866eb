"""Tiny random inpainting models (no downloads): the tiny SD / SDXL folders with a UNet
that takes 2C+1 = 9 input channels (latents, mask, masked-image latents), as
stable-diffusion-inpainting and the SDXL inpainting model do.

API::

    save_tiny_inpaint_folder(path, kind="sd1", seed=0) -> Path
        loads with StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None)
    save_tiny_sdxl_inpaint_folder(path, seed=0) -> Path
        loads with StableDiffusionXLInpaintPipeline.from_pretrained(path)
    test_images(size=64, seed=0) -> (init RGB image, mask L image: a white rectangle on black)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers_tiny import _perturb, assert_same_weights, save_tiny_diffusers_folder

INPAINT_CHANNELS = 9


def _nine_channel_unet(folder: Path, seed: int, pipeline_class: str) -> Path:
    """Replace folder/unet by a seeded random copy of its config with 9 input channels."""
    from diffusers import UNet2DConditionModel

    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["in_channels"] = INPAINT_CHANNELS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 50)
        unet = UNet2DConditionModel(**cfg)
    _perturb(unet, torch.Generator().manual_seed(40_000 + seed))
    unet.eval()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    back = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert_same_weights(unet, back, "saved 9-channel unet")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = pipeline_class
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def save_tiny_inpaint_folder(path, kind: str = "sd1", seed: int = 0) -> Path:
    out = save_tiny_diffusers_folder(path, kind, seed)
    return _nine_channel_unet(Path(out), seed, "StableDiffusionInpaintPipeline")


def save_tiny_sdxl_inpaint_folder(path, seed: int = 0) -> Path:
    from helpers_sdxl import save_tiny_sdxl_folder

    out = save_tiny_sdxl_folder(path, seed)
    return _nine_channel_unet(Path(out), seed, "StableDiffusionXLInpaintPipeline")


def test_images(size: int = 64, seed: int = 0, height: int | None = None) -> tuple[Image.Image, Image.Image]:
    """A random RGB picture and a mask: white rectangle (repaint) on black (keep)."""
    h = height or size
    rng = np.random.default_rng(seed)
    init = Image.fromarray(rng.integers(0, 256, (h, size, 3), dtype=np.uint8))
    m = np.zeros((h, size), np.uint8)
    m[h // 4: h // 2 + 4, size // 4: size // 2 + 12] = 255
    return init, Image.fromarray(m, mode="L")


test_images.__test__ = False   # a helper, not a pytest test
