"""What SDXL (family "sdxl") adds to the shared generation loop, without torch.

Mirrors diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline:

* ``encode_prompt``: the prompt through both tokenizers and text encoders; the
  two penultimate hidden states concatenated on the channels (768 + 1280 = 2048
  at full size) and the pooled ``text_embeds`` of text_encoder_2. The same text
  goes to both encoders (diffusers' ``prompt_2`` defaults to ``prompt``).
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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ManifestError
from ..image import check_finite
from ..tokenizer import ClipTokenizer
from . import stages
from .model import LoadedModel, StageTimer

FAMILY = "sdxl"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def is_sdxl(model: LoadedModel) -> bool:
    return model.manifest.family == FAMILY


@dataclass(frozen=True)
class SDXLEncodedPrompt:
    embeddings: np.ndarray      # (1, max_length, hidden_1 + hidden_2) float32
    pooled: np.ndarray          # (1, projection) float32: text_encoder_2's text_embeds
    truncated: bool
    dropped_text: str

    def zeros(self) -> "SDXLEncodedPrompt":
        return SDXLEncodedPrompt(np.zeros_like(self.embeddings), np.zeros_like(self.pooled), False, "")


def options(model: LoadedModel) -> dict:
    o = dict(model.manifest.raw.get("sdxl") or {})
    o.setdefault("force_zeros_for_empty_prompt", True)
    o.setdefault("requires_aesthetics_score", False)
    o.setdefault("aesthetic_score", 6.0)
    o.setdefault("negative_aesthetic_score", 2.5)
    return o


def _tokenizer_2(model: LoadedModel) -> tuple[ClipTokenizer, int]:
    cached = getattr(model, "_sdxl_tokenizer_2", None)
    if cached is None:
        info = model.manifest.raw.get("tokenizer_2")
        if not isinstance(info, dict) or "path" not in info:
            raise ManifestError(f"SDXL model folder {model.manifest.root} has no tokenizer_2",
                                hint="re-export the model with `cpuflow export`")
        tok = ClipTokenizer.from_dir(Path(model.manifest.path(info["path"])))
        cached = (tok, int(info.get("max_length", tok.max_length)))
        model._sdxl_tokenizer_2 = cached  # type: ignore[attr-defined]
    return cached


def encode_prompt(model: LoadedModel, text: str, timer: StageTimer) -> SDXLEncodedPrompt:
    """Both text encoders on ``text``: concatenated penultimate states + pooled text_embeds."""
    tok2, max2 = _tokenizer_2(model)
    hidden, pooled = [], None
    truncated, dropped = False, ""
    for name, tokenizer, max_length in (("text_encoder", model.tokenizer, model.max_length),
                                        ("text_encoder_2", tok2, max2)):
        tok = tokenizer(text, max_length=max_length)
        if tok.truncated and not truncated:
            truncated, dropped = True, tok.dropped_text
        t0 = time.perf_counter()
        out = model.run(name, {"batch": 1}, {"input_ids": tok.ids.astype(np.int64)[None, :]})
        timer.add("text_encoder", time.perf_counter() - t0)
        h = out["penultimate_hidden_states"]
        check_finite(f"{name} output", h)
        hidden.append(h)
        if "text_embeds" in out:
            pooled = out["text_embeds"]
            check_finite(f"{name} text_embeds", pooled)
    if pooled is None:
        raise ManifestError("the SDXL text_encoder_2 has no text_embeds output",
                            hint="re-export the model with `cpuflow export`")
    emb = np.concatenate(hidden, axis=-1)
    return SDXLEncodedPrompt(np.ascontiguousarray(emb, dtype=np.float32),
                             np.ascontiguousarray(pooled, dtype=np.float32), truncated, dropped)


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


def negative_conditioning(model: LoadedModel, negative_text: str, cond: SDXLEncodedPrompt,
                          encode: Callable[[], SDXLEncodedPrompt]) -> SDXLEncodedPrompt:
    """The negative branch: zeros for an empty negative prompt when the model says so
    (diffusers: no negative prompt + force_zeros_for_empty_prompt), else ``encode()``."""
    if negative_text == "" and options(model)["force_zeros_for_empty_prompt"]:
        return cond.zeros()
    return encode()


def guided_model_fn(model: LoadedModel, cond: SDXLEncodedPrompt, uncond: SDXLEncodedPrompt | None,
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
