"""What SDXL (family "sdxl") adds to the shared generation loop, without torch.

Mirrors diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline:

* the prompt: stages.encode_prompt runs both tokenizers and text encoders
  (cpuflow/prompt_encoding.py); the two penultimate hidden states concatenated
  on the channels (768 + 1280 = 2048 at full size) and the pooled
  ``text_embeds`` of text_encoder_2. The same text goes to both encoders
  (diffusers' ``prompt_2`` defaults to ``prompt``).
* the negative branch: an EMPTY negative prompt with the model's
  ``force_zeros_for_empty_prompt`` (SDXL base: true) gives zeros for both the
  embeddings and the pooled embeds, as diffusers does when no negative prompt is
  given; a non-empty one is encoded like the prompt.
* ``time_ids``: original_size + crops_coords_top_left + target_size =
  (H, W, 0, 0, H, W); for models whose config ``requires_aesthetics_score``
  (img2img / refiner style) (H, W, 0, 0, aesthetic_score) and
  (H, W, 0, 0, negative_aesthetic_score) for the negative branch.
* the UNet with classifier-free guidance, batch ordered [uncond, cond] like the
  SD path, with text_embeds and time_ids batched the same way.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ManifestError
from ..prompt_encoding import EncodedPrompt
from . import stages
from .model import LoadedModel, StageTimer

FAMILY = "sdxl"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def is_sdxl(model: LoadedModel) -> bool:
    return model.manifest.family == FAMILY


def options(model: LoadedModel) -> dict:
    o = dict(model.manifest.raw.get("sdxl") or {})
    o.setdefault("force_zeros_for_empty_prompt", True)
    o.setdefault("requires_aesthetics_score", False)
    o.setdefault("aesthetic_score", 6.0)
    o.setdefault("negative_aesthetic_score", 2.5)
    return o


def time_ids(model: LoadedModel, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) add_time_ids, each (1, n) float32."""
    o = options(model)
    n = int(model.manifest.components["unet"].input("time_ids").shape[-1])
    if o["requires_aesthetics_score"]:
        pos = [height, width, 0, 0, float(o["aesthetic_score"])]
        neg = [height, width, 0, 0, float(o["negative_aesthetic_score"])]
    else:
        pos = neg = [height, width, 0, 0, height, width]
    if len(pos) != n:
        raise ManifestError(f"the SDXL unet takes {n} time ids but the model's options give {len(pos)} "
                            f"(requires_aesthetics_score={o['requires_aesthetics_score']})",
                            hint="re-export the model with `cpuflow export`")
    return np.asarray([pos], np.float32), np.asarray([neg], np.float32)


def negative_conditioning(model: LoadedModel, negative_text: str, cond: EncodedPrompt,
                          encode: Callable[[], EncodedPrompt]) -> EncodedPrompt:
    """The negative branch: zeros for an empty negative prompt when the model says so
    (diffusers: no negative prompt + force_zeros_for_empty_prompt), else ``encode()``."""
    if negative_text == "" and options(model)["force_zeros_for_empty_prompt"]:
        return cond.zeros()
    return encode()


def guided_model_fn(model: LoadedModel, cond: EncodedPrompt, uncond: EncodedPrompt | None,
                    guidance: float, latent_dims: dict, timer: StageTimer, width: int, height: int,
                    **unet_inputs) -> Callable[[np.ndarray, float], np.ndarray]:
    """The SDXL UNet with classifier-free guidance: stages.guided_model_fn with the
    pooled text embeddings and the time ids as per-branch inputs."""
    pos_ids, neg_ids = time_ids(model, width, height)
    return stages.guided_model_fn(
        model, cond.embeddings, None if uncond is None else uncond.embeddings, guidance, latent_dims, timer,
        cond_extra={"text_embeds": cond.pooled, "time_ids": pos_ids},
        uncond_extra=None if uncond is None else {"text_embeds": uncond.pooled, "time_ids": neg_ids},
        **unet_inputs)
