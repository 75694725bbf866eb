"""A tiny, seeded, random x4 upscaler (StableDiffusionUpscalePipeline architecture) for tests.

Built in-process with diffusers / transformers, no downloads, well under a second:

* UNet2DConditionModel with 7 input channels (4 latent + 3 image) and ``num_class_embeds``
  1000 (the noise level is the class label), blocks (32, 32, 64): DownBlock2D then two
  CrossAttnDownBlock2D, the first of them cross-attention only (``only_cross_attention``, as
  the real upscaler's lower levels), linear projections, cross-attention 192 wide;
* AutoencoderKL with 3 levels (downscale 4, as the real one) and its scaling factor 0.08333;
* the SD 2-style tiny text encoder and tokenizer of tests/helpers_tiny.py (its ``tiny_sd_components``);
* DDIMScheduler (v-prediction) and the DDPMScheduler ``low_res_scheduler`` with the real
  upscaler's configs (export/configs/x4-upscaler), ``max_noise_level`` 350.

Images of any size that is a multiple of 4 (latents have the input's size, the output is 4x).
Random weights: plumbing and parity, not images.

API::

    save_tiny_upscale_folder(path, seed=0) -> Path
        loads with StableDiffusionUpscalePipeline.from_pretrained(path)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from helpers_seeded import seeded_modules
from helpers_tiny import tiny_configs, tiny_sd_components

CONFIGS = Path(__file__).resolve().parents[1] / "export" / "configs" / "x4-upscaler"
MAX_NOISE_LEVEL = 350


def tiny_upscale_configs() -> dict[str, dict]:
    sd2 = tiny_configs("sd2")
    unet = {
        "sample_size": 16, "in_channels": 7, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "only_cross_attention": [True, True, False], "attention_head_dim": 2, "use_linear_projection": True,
        "norm_num_groups": 32, "cross_attention_dim": sd2["text_encoder"]["hidden_size"], "num_class_embeds": 1000,
    }
    vae = {
        "sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32, 64], "layers_per_block": 1, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "scaling_factor": 0.08333,
    }

    def read(rel: str) -> dict:
        return json.loads((CONFIGS / rel).read_text())

    return {"unet": unet, "vae": vae, "text_encoder": sd2["text_encoder"],
            "scheduler": read("scheduler/scheduler_config.json"),
            "low_res_scheduler": read("low_res_scheduler/scheduler_config.json")}


def save_tiny_upscale_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    """A complete StableDiffusionUpscalePipeline folder with tiny random weights (same seed -> same weights)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_upscale_configs()
    # the text encoder and tokenizer: tests/helpers_tiny.py's SD 2-style ones, built there
    te = tiny_sd_components("sd2", seed, tokenizer_dir=out / "tokenizer").text_encoder
    unet, vae = seeded_modules([(seed, lambda: UNet2DConditionModel(**cfg["unet"])),
                                (seed + 1, lambda: AutoencoderKL(**cfg["vae"]))], 40_000 + seed)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    for name in ("scheduler", "low_res_scheduler"):
        (out / name).mkdir(exist_ok=True)
        (out / name / "scheduler_config.json").write_text(json.dumps(cfg[name], indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionUpscalePipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "safety_checker": [None, None], "watermarker": [None, None],
        "low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": MAX_NOISE_LEVEL,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
    return out
