"""A tiny, seeded, random AutoencoderTiny (TAESD architecture, small widths) for tests.

``tiny_taesd(seed)``: 8 channels per block, one block per level (4 levels: the
same 8x downscale and 4 latent channels as the tiny SD models of
helpers_tiny.py). Every parameter is perturbed after init, and the last
decoder conv's bias is moved by 0.5 so that the random decoder's output sits
inside [-1, 1] around 0: parity measured on 8-bit images then compares real values, not
clipped ones.

``save_tiny_taesd_folder(path, seed)``: the same model as a diffusers folder
(config.json + diffusion_pytorch_model.safetensors), what ``--taesd`` reads.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_TAESD_CONFIG = {
    "encoder_block_out_channels": [8, 8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8, 8],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
    "latent_channels": 4,
}


def tiny_taesd(seed: int = 0):
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(30_000 + seed)
        m = AutoencoderTiny(**TINY_TAESD_CONFIG)
        gen = torch.Generator().manual_seed(40_000 + seed)
        with torch.no_grad():
            for _, p in sorted(m.named_parameters(), key=lambda kv: kv[0]):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
            last = [mod for mod in m.decoder.layers if isinstance(mod, torch.nn.Conv2d)][-1]
            last.bias.add_(0.5)    # the decoder's [0, 1] output centred at 0.5 (then [-1, 1] around 0)
    return m.float().eval()


def save_tiny_taesd_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    out = Path(path)
    tiny_taesd(seed).save_pretrained(out, safe_serialization=True)
    return out
