"""Tiny few-step models and LoRA files for tests (random weights: plumbing and parity only).

* :func:`save_tiny_lcm_folder`: the tiny sd1 model with a guidance-embedding
  UNet (``time_cond_proj_dim``, as LCM distilled with guidance) and an
  LCMScheduler config.
* :func:`save_tiny_lcm_sdxl_folder`: the tiny SDXL (tests/helpers_sdxl.py) with
  a guidance-embedding UNet and LCMScheduler, as latent-consistency/lcm-sdxl.
* :func:`save_tiny_turbo_folder`: the tiny sd2 model with an SD-Turbo style
  scheduler (timestep_spacing "trailing").
* :func:`save_tiny_lora`: a LoRA for a tiny model's UNet and text encoder,
  made with peft (random, non-zero B so it changes the weights), saved in the
  diffusers format or the kohya one (lora_unet_... / lora_te_... with alpha).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from helpers_tiny import _perturb, save_tiny_diffusers_folder, tiny_configs, tiny_sd_components

LCM_SCHEDULER = {
    "_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "original_inference_steps": 50, "clip_sample": False, "set_alpha_to_one": True,
    "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading", "timestep_scaling": 10.0,
    "trained_betas": None,
}
TURBO_SCHEDULER = {  # stabilityai/sd-turbo's scheduler_config.json, with the ancestral class
    "_class_name": "EulerAncestralDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": None,
}
TIME_COND_PROJ_DIM = 32


def _set_scheduler(folder: Path, scheduler: dict) -> None:
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tiny_lcm_folder(path: str | os.PathLike, seed: int = 0, dim: int = TIME_COND_PROJ_DIM) -> Path:
    """The tiny sd1 folder whose UNet takes a guidance embedding, with LCMScheduler."""
    from diffusers import UNet2DConditionModel

    out = save_tiny_diffusers_folder(path, "sd1", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_configs("sd1")["unet"], time_cond_proj_dim=dim)
    _perturb(unet, torch.Generator().manual_seed(20_000 + seed))
    unet.eval().save_pretrained(out / "unet", safe_serialization=True)
    _set_scheduler(out, LCM_SCHEDULER)
    return out


def save_tiny_turbo_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    out = save_tiny_diffusers_folder(path, "sd2", seed=seed)
    _set_scheduler(out, TURBO_SCHEDULER)
    return out


def _random_lora_layers(module: torch.nn.Module, targets: list[str], rank: int, alpha: int,
                        gen: torch.Generator) -> dict:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    # peft itself (transformers' add_adapter wants a newer peft than some indexes have)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
                            module)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return get_peft_model_state_dict(module)


def save_tiny_lora(path: str | os.PathLike, kind: str = "sd1", fmt: str = "diffusers", seed: int = 0,
                   rank: int = 4, alpha: int = 2) -> Path:
    """A LoRA file (safetensors) for the tiny ``kind`` model: UNet attention +
    text-encoder attention projections. ``fmt``: "diffusers" (diffusers' own
    save_lora_weights) or "kohya" (the peft keys renamed: lora_unet_* /
    lora_te_* with lora_down / lora_up and an alpha per layer)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    c = tiny_sd_components(kind, seed=0)
    gen = torch.Generator().manual_seed(30_000 + seed)
    unet_sd = _random_lora_layers(c.unet, ["to_q", "to_k", "to_v", "to_out.0"], rank, alpha, gen)
    te_sd = _random_lora_layers(c.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], rank, alpha, gen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        folder = path.parent / (path.stem + ".d")
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
                                                  text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd),
                                                  weight_name=path.name)
        (folder / path.name).replace(path)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    elif fmt == "kohya":
        # kohya-ss / A1111 naming: lora_unet_<module path with _>.lora_down/lora_up.weight + .alpha
        kohya = {}
        for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_", te_sd)):
            for k, v in sd.items():
                module, _, part = k.rpartition(".lora_")
                if prefix == "lora_te_" and not module.startswith("text_model."):
                    module = "text_model." + module   # as real kohya files name the CLIPTextModel
                stem = prefix + module.replace(".", "_")
                kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v.contiguous()
                kohya[f"{stem}.alpha"] = torch.tensor(float(alpha))
        save_file(kohya, str(path))
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}")
    return path


def save_tiny_lcm_sdxl_folder(path: str | os.PathLike, seed: int = 0, dim: int = TIME_COND_PROJ_DIM) -> Path:
    """The tiny SDXL (tests/helpers_sdxl.py) made into an LCM-SDXL the way the README
    tells users to assemble latent-consistency/lcm-sdxl (a UNet-only repo): the base
    pipeline with the guidance-embedding UNet (``time_cond_proj_dim``) swapped in,
    ``LCMScheduler.from_config(pipe.scheduler.config)``, ``save_pretrained``."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from helpers_sdxl import save_tiny_sdxl_folder, tiny_sdxl_configs

    base = save_tiny_sdxl_folder(Path(path).parent / (Path(path).name + "-base"), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sdxl_configs()["unet"], time_cond_proj_dim=dim)
    _perturb(unet, torch.Generator().manual_seed(40_000 + seed))
    pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet.eval(), add_watermarker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
