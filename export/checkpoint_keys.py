"""Key mapping between the ORIGINAL Stable Diffusion checkpoint layout and diffusers.

Original (CompVis / Stability "ldm") single-file layout::

    model.diffusion_model.*                  UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                      VAE  (encoder.down.N.block.M / decoder.up.N ...)
    cond_stage_model.transformer.text_model.*  SD 1.x: a transformers CLIPTextModel
    cond_stage_model.model.*                 SD 2.x: an OpenCLIP text tower (resblocks, in_proj_weight)

original -> diffusers is done with diffusers' own converters
(``diffusers.loaders.single_file_utils``), see :func:`unet_to_diffusers` and
friends; diffusers -> original (:func:`unet_to_original`, ...) is written here,
independently, from the layout above (it is what the tests use to produce
single-file checkpoints; a round trip through both must be exact).
"""
from __future__ import annotations

import re
from typing import Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."          # + text_model.* (transformers CLIPTextModel)
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

# Resnet sub-module names: diffusers -> original (UNet).
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Old diffusers (< 0.14) VAE attention names -> current ones.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or "Attn" in block_type.replace("CrossAttn", "")


def _resnet_to_original(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head in _UNET_RESNET:
        return _UNET_RESNET[head] + "." + tail
    raise KeyError(rest)


# ---------------------------------------------------------------- diffusers -> original
def unet_to_original(sd: Mapping, config: Mapping, prefix: str = UNET_PREFIX) -> dict:
    """A diffusers UNet2DConditionModel state dict -> the original ``input_blocks`` layout."""
    L = int(config["layers_per_block"])
    up_types = list(config["up_block_types"])
    out: dict = {}
    for key, v in sd.items():
        m = None
        if key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + key.split(".", 2)[2]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + key.split(".", 2)[2]
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + key[len("conv_in."):]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + key[len("conv_norm_out."):]
        elif key.startswith("conv_out."):
            new = "out.2." + key[len("conv_out."):]
        elif (m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{i * (L + 1) + j + 1}.0.{_resnet_to_original(rest)}"
        elif (m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{i * (L + 1) + j + 1}.1.{rest}"
        elif (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)):
            i, rest = int(m[1]), m[2]
            new = f"input_blocks.{(i + 1) * (L + 1)}.0.op.{rest}"
        elif (m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key)):
            new = f"middle_block.{2 * int(m[1])}.{_resnet_to_original(m[2])}"
        elif (m := re.match(r"mid_block\.attentions\.0\.(.+)", key)):
            new = f"middle_block.1.{m[1]}"
        elif (m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{i * (L + 1) + j}.0.{_resnet_to_original(rest)}"
        elif (m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{i * (L + 1) + j}.1.{rest}"
        elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)):
            i, rest = int(m[1]), m[2]
            slot = 2 if _has_attention(up_types[i]) else 1
            new = f"output_blocks.{i * (L + 1) + L}.{slot}.conv.{rest}"
        else:
            raise KeyError(f"unet key {key!r} has no original-layout equivalent")
        out[prefix + new] = v
    return out


def vae_to_original(sd: Mapping, config: Mapping, prefix: str = VAE_PREFIX) -> dict:
    """A diffusers AutoencoderKL state dict -> the original ``encoder.down.N`` layout.

    The mid-block attention's q/k/v/proj_out become 1x1 convolutions (4-D), as in ldm."""
    n = len(config["block_out_channels"])
    out: dict = {}
    for key, v in sd.items():
        m = None
        if (m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key)):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.match(r"(encoder|decoder)\.conv_(in|out)\.", key) or key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif (m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif (m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and v.ndim == 2:
                v = v[:, :, None, None]
        else:
            raise KeyError(f"vae key {key!r} has no original-layout equivalent")
        out[prefix + new] = v
    return out


def _strip_text_model(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def clip_to_original(sd: Mapping, prefix: str = CLIP_PREFIX) -> dict:
    """A transformers CLIPTextModel state dict (with or without ``text_model.``) -> SD 1.x layout."""
    return {prefix + "text_model." + _strip_text_model(k): v for k, v in sd.items()}


def openclip_to_original(sd: Mapping, prefix: str = OPENCLIP_PREFIX) -> dict:
    """A CLIPTextModel state dict -> the OpenCLIP text tower layout of SD 2.x checkpoints.

    q/k/v projections are concatenated into ``attn.in_proj_weight`` / ``in_proj_bias``.
    (Real SD 2.x files also hold one more resblock than the text encoder uses,
    plus ``text_projection`` and ``logit_scale``; add those yourself if wanted.)"""
    sd = {_strip_text_model(k): v for k, v in sd.items()}
    out: dict = {}
    qkv: dict = {}
    for key, v in sd.items():
        m = None
        if key == "embeddings.token_embedding.weight":
            new = "token_embedding.weight"
        elif key == "embeddings.position_embedding.weight":
            new = "positional_embedding"
        elif key == "embeddings.position_ids":
            continue
        elif (m := re.match(r"final_layer_norm\.(weight|bias)", key)):
            new = f"ln_final.{m[1]}"
        elif (m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)):
            qkv[(int(m[1]), m[3], m[2])] = v
            continue
        elif (m := re.match(r"encoder\.layers\.(\d+)\.(.+)", key)):
            i, rest = m[1], m[2]
            rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            new = f"transformer.resblocks.{i}.{rest}"
        else:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP equivalent")
        out[prefix + new] = v
    import torch

    for i, kind in sorted({(i, kind) for (i, kind, _) in qkv}):
        parts = [qkv[(i, kind, c)] for c in "qkv"]
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


# ---------------------------------------------------------------- original -> diffusers
def unet_to_diffusers(checkpoint: Mapping, config: Mapping, *, extract_ema: bool = False) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(checkpoint, dict(config), extract_ema=extract_ema)


def vae_to_diffusers(checkpoint: Mapping, config: Mapping) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_only = {k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
    return convert_ldm_vae_checkpoint(vae_only, dict(config))


def clip_to_diffusers(checkpoint: Mapping) -> dict:
    """SD 1.x text encoder -> CLIPTextModel keys, always WITHOUT the ``text_model.`` prefix."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    only = {k: v for k, v in checkpoint.items() if k.startswith(CLIP_PREFIX)}
    return {_strip_text_model(k): v for k, v in convert_ldm_clip_checkpoint(only).items()}


def openclip_to_diffusers(checkpoint: Mapping, num_layers: int, hidden_size: int) -> dict:
    """SD 2.x OpenCLIP text tower -> CLIPTextModel keys (no ``text_model.`` prefix).

    Keeps resblocks ``0 .. num_layers-1`` (SD 2.x uses the penultimate layer:
    its files hold one more block than the text encoder has) and drops
    ``text_projection`` / ``logit_scale``, which CLIPTextModel does not have."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    class _Cfg:  # convert_open_clip_checkpoint only reads text_model.config.hidden_size
        class config:
            pass

    _Cfg.config.hidden_size = hidden_size
    only = {}
    for k, v in checkpoint.items():
        if not k.startswith(OPENCLIP_PREFIX):
            continue
        m = re.match(re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.", k)
        if m and int(m[1]) >= num_layers:
            continue
        only[k] = v
    conv = convert_open_clip_checkpoint(_Cfg, only, prefix=OPENCLIP_PREFIX)
    return {_strip_text_model(k): v for k, v in conv.items() if not k.startswith("text_projection")}


def normalize_text_encoder_keys(sd: Mapping, model_keys) -> dict:
    """Match a CLIPTextModel state dict to the installed transformers' naming.

    transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` prefix);
    older files and older versions have it. ``embeddings.position_ids`` (a
    buffer older versions saved) is dropped when the model does not expect it."""
    model_keys = set(model_keys)
    wants_prefix = any(k.startswith("text_model.") for k in model_keys)
    out = {}
    for k, v in sd.items():
        base = _strip_text_model(k)
        new = ("text_model." + base) if wants_prefix else base
        if base in ("embeddings.position_ids", "text_projection.weight") and new not in model_keys:
            continue   # a buffer older versions saved / CLIPTextModelWithProjection's head
        out[new] = v
    return out


def normalize_vae_keys(sd: Mapping) -> dict:
    """Rename the attention keys of VAEs saved by diffusers < 0.14 (query/key/value/proj_attn)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = m[1] + LEGACY_VAE_ATTENTION[m[2]] + "." + m[3]
            if m[3] == "weight" and v.ndim == 4:
                v = v[:, :, 0, 0]
        out[k] = v
    return out
