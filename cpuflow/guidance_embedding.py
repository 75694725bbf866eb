"""Guidance as a UNet input: the LCM guidance embedding (torch-free).

Latent Consistency Models distilled with guidance (Luo et al. 2023, sec. 4.2,
"w-conditioned" LCM; diffusers: a UNet whose ``config.time_cond_proj_dim`` is
set) take the guidance scale as an input instead of running classifier-free
guidance: the UNet adds an embedding of ``w`` to its timestep embedding, and
the pipeline runs it ONCE per step at batch 1, with no unconditional branch.

diffusers (``StableDiffusionPipeline`` and ``LatentConsistencyModelPipeline``)
computes the embedding as in VDM (Kingma et al. 2021, appendix; google-research
vdm ``get_timestep_embedding``), with ``w = guidance_scale - 1``::

    w = w * 1000
    e = exp(arange(half) * -(log(10000) / (half - 1)))
    emb = concat(sin(w e), cos(w e))   (zero-padded to an odd dim)

The exporter gives such UNets a ``timestep_cond`` input (float32
``[batch, time_cond_proj_dim]``); this module computes what goes in it, in
float32 with the same operand order (see the note on exp below).
"""
from __future__ import annotations

import numpy as np

INPUT_NAME = "timestep_cond"


def embedding_dim(manifest) -> int | None:
    """``time_cond_proj_dim`` of the model's UNet when it takes the guidance
    embedding (an input named ``timestep_cond``), else None (plain CFG)."""
    unet = manifest.components.get("unet")
    if unet is None or not any(s.name == INPUT_NAME for s in unet.inputs):
        return None
    dim = unet.config.get("time_cond_proj_dim")
    if dim is None:  # the input's last dimension says it too
        dim = next(s.shape[-1] for s in unet.inputs if s.name == INPUT_NAME)
    return int(dim)


def guidance_embedding(guidance: float, dim: int, batch: int = 1) -> np.ndarray:
    """float32 ``[batch, dim]``: diffusers' ``get_guidance_scale_embedding(
    torch.tensor(guidance - 1).repeat(batch), embedding_dim=dim)``."""
    if dim < 4:  # diffusers divides by (dim // 2 - 1): NaN below 4
        raise ValueError(f"guidance embedding dim must be at least 4, got {dim}")
    # torch.tensor(python float) is float32; then w * 1000.0 in float32
    w = np.full((batch,), np.float32(guidance - 1), dtype=np.float32) * np.float32(1000.0)
    half = dim // 2
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    # exp in float64, rounded once: torch's float32 exp is (almost always) correctly
    # rounded, numpy's float32 one is often 1 ulp off, and w reaches 1e4, so an ulp
    # of a frequency moves sin/cos by 1e-4. Where torch's exp itself is 1 ulp off
    # (some entries of dim 256) the two still differ by up to ~1e-3 on the
    # highest-frequency entries: the float32 conditioning of sin(1e4 x), in torch too.
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)
    args = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return np.ascontiguousarray(emb, dtype=np.float32)
