"""The SDXL components: wrappers and I/O contract (see :mod:`.components` for the SD ones).

SDXL conditions the UNet on two CLIP text encoders and two extra inputs:

* ``text_encoder`` (CLIPTextModel): inputs_embeds -> ``penultimate_hidden_states``
  (``hidden_states[-2]``, NOT last_hidden_state: diffusers' ``encode_prompt`` with
  ``clip_skip=None``) and every layer's raw ``hidden_states`` (clip skip);
* ``text_encoder_2`` (CLIPTextModelWithProjection): inputs_embeds + input_ids ->
  the same two and ``text_embeds`` (the projected pooled output);
* ``unet``: sample, timestep, encoder_hidden_states (both penultimate states
  concatenated on the channels, 768 + 1280 = 2048 at full size), ``text_embeds``
  [batch, 1280] and ``time_ids`` [batch, 6] (original size, crop top-left, target
  size; 5 with the aesthetic score of refiner-style models) -> out_sample;
* ``vae_decoder`` / ``vae_encoder``: as SD (the SDXL VAE, scaling factor 0.13025,
  exported and run in float32).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import components as base
from .guidance_unet import SDXLGuidanceEmbeddedUNetWrapper, has_guidance_input

COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


class SDXLUNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> out_sample."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         return_dict=False)[0]


def text_encoder_spec(text_encoder: Any, max_length: int, *, name: str, pooled: bool) -> base.ComponentSpec:
    """SDXL's encoders: the penultimate layer by default and raw hidden states for
    clip skip (diffusers' SDXL ``encode_prompt``); text_encoder_2 also gives
    ``text_embeds`` pooled at the first eos of ``input_ids``."""
    return base.text_encoder_spec(text_encoder, max_length, name=name, normed=False, pooled=pooled)


def unet_spec(unet: Any, max_length: int, text_embeds_dim: int) -> base.ComponentSpec:
    spec = base.unet_spec(unet, max_length)
    cfg = unet.config
    td = int(cfg.addition_time_embed_dim)
    n_ids = (int(cfg.projection_class_embeddings_input_dim) - text_embeds_dim) // td
    te = base._spec("text_embeds", "float32", ["batch", text_embeds_dim])
    ti = base._spec("time_ids", "float32", ["batch", n_ids])
    make_sd = spec.make_inputs

    def make(dims, rng):
        feeds = make_sd(dims, rng)
        b = dims["batch"]
        feeds["text_embeds"] = rng.standard_normal((b, text_embeds_dim), dtype=np.float32)
        # sizes and crop offsets in pixels, as the pipeline passes them
        feeds["time_ids"] = rng.integers(0, 1025, size=(b, n_ids)).astype(np.float32)
        return feeds

    spec.wrap = SDXLUNetWrapper
    if has_guidance_input(spec):  # LCM-SDXL (time_cond_proj_dim): timestep_cond before SDXL's two inputs
        spec.wrap = SDXLGuidanceEmbeddedUNetWrapper
    spec.inputs = [*spec.inputs, te, ti]
    spec.dynamic_axes = dict(spec.dynamic_axes, text_embeds=base._axes(te), time_ids=base._axes(ti))
    spec.make_inputs = make
    spec.config = dict(spec.config, addition_embed_type="text_time", addition_time_embed_dim=td,
                       text_embeds_dim=text_embeds_dim, time_ids=n_ids)
    return spec


def component_specs(loaded: Any, max_length: int) -> dict[str, base.ComponentSpec]:
    """All five SDXL component specs, in export order."""
    proj = int(loaded.text_encoder_2.config.projection_dim)
    return {
        "text_encoder": text_encoder_spec(loaded.text_encoder, max_length, name="text_encoder", pooled=False),
        "text_encoder_2": text_encoder_spec(loaded.text_encoder_2, max_length, name="text_encoder_2", pooled=True),
        "unet": unet_spec(loaded.unet, max_length, proj),
        "vae_decoder": base.vae_decoder_spec(loaded.vae),
        "vae_encoder": base.vae_encoder_spec(loaded.vae),
    }
