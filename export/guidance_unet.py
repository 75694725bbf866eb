"""The UNet of a guidance-distilled LCM: guidance as an extra input.

A UNet whose config sets ``time_cond_proj_dim`` (LCM distilled with guidance,
e.g. SimianLuo/LCM_Dreamshaper_v7) adds a projection of a guidance embedding
to its timestep embedding (diffusers ``UNet2DConditionModel(...,
timestep_cond=...)``). Only such UNets get the extra input ``timestep_cond``
(float32 ``[batch, time_cond_proj_dim]``); the runtime fills it with
``cpuflow.guidance_embedding.guidance_embedding(guidance, dim)`` and runs no
unconditional branch, as diffusers does. An SDXL UNet with the embedding
(LCM-SDXL) takes it before SDXL's ``text_embeds`` / ``time_ids``
(:class:`SDXLGuidanceEmbeddedUNetWrapper`). Every other UNet keeps its plain
signature.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cpuflow.guidance_embedding import INPUT_NAME, guidance_embedding
from cpuflow.manifest import TensorSpec

# guidance scales the parity gate feeds (one per batch row): LCM's usual range
CHECK_GUIDANCE = (1.5, 8.0, 4.0, 1.0)


class GuidanceEmbeddedUNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, timestep_cond) -> out_sample."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


class SDXLGuidanceEmbeddedUNetWrapper(torch.nn.Module):
    """LCM-SDXL (e.g. latent-consistency/lcm-sdxl): (sample, timestep,
    encoder_hidden_states, timestep_cond, text_embeds, time_ids) -> out_sample.
    The input order is the one export.components_sdxl.unet_spec builds: the SD
    UNet's inputs (with ``timestep_cond``), then SDXL's two."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         return_dict=False)[0]


def has_guidance_input(spec: Any) -> bool:
    return any(s.name == INPUT_NAME for s in spec.inputs)


def add_guidance_embedding_input(spec: Any, dim: int) -> None:
    """Turn the plain UNet ``spec`` (export.components.ComponentSpec) into the
    four-input one, in place: wrapper, input list, dynamic axes, sample inputs
    (real guidance embeddings, not noise, so the gate checks realistic values)."""
    cond = TensorSpec(INPUT_NAME, "float32", ("batch", int(dim)))
    spec.inputs = list(spec.inputs) + [cond]
    spec.dynamic_axes = dict(spec.dynamic_axes, **{INPUT_NAME: {0: "batch"}})
    spec.wrap = GuidanceEmbeddedUNetWrapper
    spec.config = dict(spec.config, time_cond_proj_dim=int(dim), guidance_input=INPUT_NAME)
    plain = spec.make_inputs

    def make(dims, rng):
        feeds = plain(dims, rng)
        b = dims["batch"]
        feeds[INPUT_NAME] = np.concatenate(
            [guidance_embedding(CHECK_GUIDANCE[i % len(CHECK_GUIDANCE)], int(dim)) for i in range(b)], axis=0)
        return feeds

    spec.make_inputs = make
