"""A tiny, seeded, random SDXL (Stable Diffusion XL base architecture) for tests.

Built in-process with diffusers / transformers, no downloads, well under a second:

* UNet2DConditionModel with ``addition_embed_type="text_time"``: blocks (32, 64),
  DownBlock2D + CrossAttnDownBlock2D (as SDXL: no attention at the first level),
  ``transformer_layers_per_block`` (1, 2), linear projections,
  ``addition_time_embed_dim`` 8, ``projection_class_embeddings_input_dim``
  8 x 6 time ids + 32 (text_embeds), cross-attention 32 + 64 = 96, sample_size 8;
* text_encoder: CLIPTextModel, 32 wide, 3 layers (SDXL reads the penultimate one);
* text_encoder_2: CLIPTextModelWithProjection, 64 wide, 3 layers, projection 32;
* AutoencoderKL as tests/helpers_tiny.py's (downscale 8) with SDXL's scaling factor
  0.13025 and force_upcast;
* tokenizer (pad <|endoftext|>) and tokenizer_2 (pad "!"), the tiny BPE vocabulary;
* EulerDiscreteScheduler with SDXL base's config.

64x64 images, 8x8x4 latents. Random weights: plumbing and parity, not images.

API::

    save_tiny_sdxl_folder(path, seed=0, force_zeros_for_empty_prompt=True, requires_aesthetics_score=False) -> Path
        loads with StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from helpers_seeded import seeded_modules
from helpers_tiny import BOS, EOS, TINY_MAX_LENGTH, tiny_configs, tiny_vocab_and_merges, write_tiny_tokenizer

TIME_EMBED_DIM = 8
N_TIME_IDS = 6
TEXT_EMBEDS = 32

SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def tiny_sdxl_configs(requires_aesthetics_score: bool = False) -> dict[str, dict]:
    vocab, _ = tiny_vocab_and_merges()

    def text(hidden: int, act: str, pad: str) -> dict:
        return {"vocab_size": len(vocab), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                "num_hidden_layers": 3, "num_attention_heads": 2, "max_position_embeddings": TINY_MAX_LENGTH,
                "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": TEXT_EMBEDS,
                "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[pad]}

    unet = {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
        "attention_head_dim": [2, 4], "use_linear_projection": True, "norm_num_groups": 32,
        "cross_attention_dim": 32 + 64, "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_DIM,
        # 6 time ids (sizes, crop), 5 with the aesthetic score (refiner-style img2img models)
        "projection_class_embeddings_input_dim": TIME_EMBED_DIM * (N_TIME_IDS - requires_aesthetics_score)
        + TEXT_EMBEDS,
    }
    vae = dict(tiny_configs("sd1")["vae"], scaling_factor=0.13025, force_upcast=True)
    return {"unet": unet, "vae": vae, "text_encoder": text(32, "quick_gelu", EOS),
            "text_encoder_2": text(64, "gelu", "!"), "scheduler": dict(SCHEDULER)}


def save_tiny_sdxl_folder(path: str | os.PathLike, seed: int = 0, *, force_zeros_for_empty_prompt: bool = True,
                          requires_aesthetics_score: bool = False) -> Path:
    """A complete SDXL diffusers folder with tiny random weights (same seed -> same weights).

    ``requires_aesthetics_score``: a StableDiffusionXLImg2ImgPipeline folder whose UNet
    takes 5 time ids (sizes, crop, aesthetic score), as the refiner's."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_sdxl_configs(requires_aesthetics_score)
    unet, vae, te, te2 = seeded_modules(
        [(seed, lambda: UNet2DConditionModel(**cfg["unet"])), (seed + 1, lambda: AutoencoderKL(**cfg["vae"])),
         (seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))),
         (seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))], 30_000 + seed)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    te2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    write_tiny_tokenizer(out / "tokenizer", "sd1")
    write_tiny_tokenizer(out / "tokenizer_2", "sd2")    # pads with "!", as SDXL's tokenizer_2
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if requires_aesthetics_score else "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        **({"requires_aesthetics_score": True} if requires_aesthetics_score else {}),
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
    return out
