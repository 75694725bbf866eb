"""The x4 upscaler's components: wrappers and I/O contract (see :mod:`.components` for the SD ones).

* ``text_encoder``: as SD 2 (``last_hidden_state`` of the OpenCLIP text model as configured);
* ``unet``: ``sample`` [batch, 7, h, w] (the 4 latent channels, then the 3 channels of the
  noised low-res image, concatenated as StableDiffusionUpscalePipeline does), ``timestep``,
  ``encoder_hidden_states`` and ``class_labels`` int64 [batch] (the noise level that was
  added to the low-res image: the UNet's class embedding) -> ``out_sample`` [batch, 4, h, w];
* ``vae_decoder``: as SD (the upscaler's VAE: downscale 4, scaling factor 0.08333).
  No encoder: the pipeline never encodes an image (the low-res image enters the UNet as pixels).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import components as base

COMPONENT_ORDER = ("text_encoder", "unet", "vae_decoder")


class UpscaleUNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, class_labels) -> out_sample."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels):
        return self.unet(sample, timestep, encoder_hidden_states, class_labels=class_labels, return_dict=False)[0]


def unet_spec(unet: Any, max_length: int, max_noise_level: int) -> base.ComponentSpec:
    spec = base.unet_spec(unet, max_length)
    labels = base._spec("class_labels", "int64", ["batch"])
    make_sd = spec.make_inputs
    n_classes = int(unet.config.num_class_embeds)

    def make(dims, rng):
        feeds = make_sd(dims, rng)
        feeds["class_labels"] = rng.integers(0, min(max_noise_level, n_classes - 1) + 1,
                                             size=(dims["batch"],)).astype(np.int64)
        return feeds

    spec.wrap = UpscaleUNetWrapper
    spec.inputs = [*spec.inputs, labels]
    spec.dynamic_axes = dict(spec.dynamic_axes, class_labels=base._axes(labels))
    spec.make_inputs = make
    spec.config = dict(spec.config, num_class_embeds=n_classes)
    return spec


def component_specs(loaded: Any, max_length: int) -> dict[str, base.ComponentSpec]:
    """The three upscaler component specs, in export order."""
    return {
        "text_encoder": base.text_encoder_spec(loaded.text_encoder, max_length),
        "unet": unet_spec(loaded.unet, max_length, int(loaded.max_noise_level)),
        "vae_decoder": base.vae_decoder_spec(loaded.vae),
    }
