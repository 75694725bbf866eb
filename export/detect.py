"""What a checkpoint is: family, prediction type, default size and component configs.

Everything here reads tensor NAMES and SHAPES only (plus, for the prediction
type, the few hints a file may carry: safetensors metadata, a pickle's
``global_step``, the file name). Nothing is downloaded.

Families
    ``sd1``: SD 1.x. UNet cross-attention fed by a transformers CLIP text model
    (``cond_stage_model.transformer.text_model.*``), 1x1-conv ``proj_in``.
    ``sd2``: SD 2.x. OpenCLIP text tower (``cond_stage_model.model.*``, fused
    ``in_proj_weight``), linear ``proj_in`` (``use_linear_projection``).
    Widths are not used to tell them apart (a small or non-standard model is
    still recognised); the real ones have 768 / 1024-wide cross-attention.

Prediction type (a weight file cannot show it reliably), first match wins; the
``prediction_type_decided_by`` string starts with the word(s) on the right:
    1. ``prediction_type=`` (the user)                    -> "override"
    2. ``arch=`` (sd15 / sd21 / sd21-v)                   -> "arch"
    3. a ``v_pred`` marker tensor (kohya / ComfyUI)       -> "v_pred marker"
    4. safetensors metadata: ``modelspec.prediction_type``, ``ss_v_parameterization``,
       ``modelspec.architecture`` (``stable-diffusion-v2-768-v`` ...)  -> "metadata"
    5. sd2 only, as diffusers: ``global_step`` 875000 (SD 2.0-base) -> epsilon,
       110000 (SD 2.1-v) -> v_prediction                  -> "global_step"
    6. sd2 only: the file name (``vpred`` / ``768-v`` -> v; ``eps`` -> epsilon; then ``768`` -> v;
       ``512`` / ``base`` -> epsilon)                        -> "file name"
    7. sd2 only, as diffusers: any other ``global_step`` -> v_prediction -> "global_step"
    8. default, as diffusers: sd1 -> epsilon; sd2 -> v_prediction (SD 2.x 768-v)  -> "default"

Default size: ``modelspec.resolution`` metadata if present, else 512 (sd1, sd2
epsilon) or 768 (sd2 v_prediction).

Configs are the vendored ones in ``export/configs/`` adapted to the shapes
found (channel widths, levels, layers per block, attention levels,
transformer depth, context width, text width / depth / vocabulary). The few
things shapes cannot show follow the family's convention: SD 1.x UNets have 8
heads per attention, SD 2.x UNets and both text encoders 64-dim heads,
GroupNorm has 32 groups. A checkpoint that breaks these is refused with a
:class:`~cpuflow.errors.SourceError` saying what was expected and found.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cpuflow.errors import InvalidArgument, SourceError

from .checkpoint_keys import CLIP_PREFIX, EMA_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
FAMILIES = ("sd1", "sd2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# arch name -> (family, prediction type, default size, vendored config folder)
ARCHES: dict[str, tuple[str, str, int, str]] = {
    "sd15": ("sd1", "epsilon", 512, "sd15"),
    "sd21": ("sd2", "epsilon", 512, "sd21-base"),
    "sd21-v": ("sd2", "v_prediction", 768, "sd21-v"),
    "sdxl": ("sdxl", "epsilon", 1024, "sdxl"),   # random weights only (export/sources_sdxl.py)
    "x4-upscaler": ("x4-upscaler", "v_prediction", 512, "x4-upscaler"),  # export/sources_upscale.py
    # few-step latency variants (random weights only): a base arch's configs with ARCH_OVERRIDES applied
    "sd15-lcm": ("sd1", "epsilon", 512, "sd15"),
    "sd21-turbo": ("sd2", "epsilon", 512, "sd21-base"),
    "sd15-inpaint": ("sd1", "epsilon", 512, "sd15"),   # stable-diffusion-inpainting: a 9-channel UNet
}
_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "trained_betas": None}
# What differs from the base arch, as in the published models: LCM-Dreamshaper-v7 (a UNet with a
# 256-wide guidance embedding, LCMScheduler) and SD-Turbo (SD 2.1 base UNet, Euler with trailing timesteps).
ARCH_OVERRIDES: dict[str, dict[str, dict]] = {
    "sd15-lcm": {"unet": {"time_cond_proj_dim": 256},
                 "scheduler": {"_class_name": "LCMScheduler", **_SCALED_LINEAR, "clip_sample": False,
                               "original_inference_steps": 50, "set_alpha_to_one": True, "thresholding": False,
                               "timestep_scaling": 10.0, "timestep_spacing": "leading",
                               "rescale_betas_zero_snr": False}},
    "sd21-turbo": {"scheduler": {"_class_name": "EulerDiscreteScheduler", **_SCALED_LINEAR,
                                 "interpolation_type": "linear", "use_karras_sigmas": False,
                                 "timestep_spacing": "trailing"}},
}
ARCH_OVERRIDES["sd15-inpaint"] = {"unet": {"in_channels": 9}}
RANDOM_ONLY_ARCHES = ("sdxl", "sd15-lcm", "sd21-turbo", "sd15-inpaint", "x4-upscaler")
VENDORED = ("sd15", "sd21-base", "sd21-v")

SD1_UNET_HEADS = 8          # v1-inference.yaml num_heads
SD2_HEAD_CHANNELS = 64      # v2-inference*.yaml num_head_channels
CLIP_HEAD_DIM = 64          # CLIP ViT-L/14 (768/12) and OpenCLIP ViT-H/14 (1024/16)
NORM_GROUPS = 32

_EXPECTED = (
    f"a Stable Diffusion 1.x/2.x checkpoint in the original layout: {UNET_PREFIX}* (UNet), "
    f"{VAE_PREFIX}* (VAE), and {CLIP_PREFIX}text_model.* (SD 1.x CLIP) or {OPENCLIP_PREFIX}* (SD 2.x OpenCLIP)"
)


def normalize_prediction_type(value: str | None) -> str | None:
    if value is None:
        return None
    v = str(value).strip().lower().replace("-", "_")
    if v in ("epsilon", "eps", "noise"):
        return "epsilon"
    if v in ("v_prediction", "v", "vpred", "v_pred", "velocity"):
        return "v_prediction"
    raise InvalidArgument(f"unknown prediction type {value!r}: use 'epsilon' or 'v_prediction'")


def check_arch(arch: str | None) -> str | None:
    if arch is None:
        return None
    a = str(arch).strip().lower()
    aliases = {"sd1": "sd15", "sd1.5": "sd15", "sd-1.5": "sd15", "sd2": "sd21", "sd2.1": "sd21",
               "sd21-base": "sd21", "sd2-v": "sd21-v", "sd21v": "sd21-v", "sd2.1-v": "sd21-v"}
    a = aliases.get(a, a)
    if a not in ARCHES:
        raise InvalidArgument(f"unknown arch {arch!r}: choose one of {', '.join(ARCHES)}")
    return a


def vendored_dir(name: str) -> Path:
    if name not in VENDORED:
        raise InvalidArgument(f"no vendored config {name!r}: choose one of {', '.join(VENDORED)}")
    return CONFIGS_DIR / name


def load_vendored(name: str) -> dict[str, dict]:
    """The vendored configs of ``name`` (sd15 / sd21-base / sd21-v), as fresh dicts."""
    d = vendored_dir(name)
    files = {
        "model_index": "model_index.json",
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
        "tokenizer_config": "tokenizer/tokenizer_config.json",
        "special_tokens_map": "tokenizer/special_tokens_map.json",
    }
    return {k: json.loads((d / rel).read_text()) for k, rel in files.items()}


def vendored_name(family: str, prediction_type: str) -> str:
    if family == "sd1":
        return "sd15"
    return "sd21-v" if prediction_type == "v_prediction" else "sd21-base"


@dataclass
class CheckpointInfo:
    family: str
    family_decided_by: str
    prediction_type: str
    prediction_type_decided_by: str
    default_size: int
    default_size_decided_by: str
    vendored: str                       # which export/configs/ folder the configs start from
    unet_config: dict
    vae_config: dict
    text_config: dict                   # CLIPTextConfig kwargs
    text_kind: str                      # "clip" | "openclip"
    extract_ema: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "family": self.family, "family_decided_by": self.family_decided_by,
            "prediction_type": self.prediction_type,
            "prediction_type_decided_by": self.prediction_type_decided_by,
            "default_size": self.default_size, "default_size_decided_by": self.default_size_decided_by,
            "vendored_config": self.vendored, "ema_weights": self.extract_ema, "notes": list(self.notes),
        }


# ------------------------------------------------------------------ helpers
def _shape(sd: Mapping, key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return None if t is None else tuple(t.shape)


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.match(k))})


def _sample_keys(keys, n: int = 3) -> str:
    ks = sorted(keys)[:n]
    return ", ".join(ks) + (", ..." if len(keys) > n else "")


# ------------------------------------------------------------------ family
def detect_family(sd: Mapping, where: str = "the checkpoint") -> tuple[str, str, str]:
    """(family, evidence, text_kind) from the key names; SourceError for anything else."""
    keys = list(sd.keys())
    if not keys:
        raise SourceError(f"{where} holds no tensors; expected {_EXPECTED}")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SourceError(f"{where} is an SDXL single-file checkpoint: not supported yet. Convert it to a "
                          "diffusers folder first (diffusers' StableDiffusionXLPipeline.from_single_file(...)"
                          ".save_pretrained(DIR)), then export DIR")
    if any("joint_blocks." in k or "double_blocks." in k for k in keys[:2000]):
        raise SourceError(f"{where} is an SD3/Flux-style transformer checkpoint; only SD 1.x and 2.x are supported")
    has_unet = f"{UNET_PREFIX}input_blocks.0.0.weight" in sd
    if not has_unet:
        diffusers_like = [k for k in keys if k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.",
                                                           "text_model.", "mid_block."))]
        if diffusers_like:
            raise SourceError(
                f"{where} looks like a single diffusers component (keys like {_sample_keys(diffusers_like)}), "
                f"not a full checkpoint; pass the whole diffusers folder (with model_index.json) instead; "
                f"expected {_EXPECTED}")
        if any(k.startswith("control_model.") for k in keys):
            raise SourceError(f"{where} is a ControlNet; expected {_EXPECTED}")
        raise SourceError(f"unknown architecture in {where}: found keys like {_sample_keys(keys)}; expected {_EXPECTED}")
    has_clip = any(k.startswith(CLIP_PREFIX) and k.endswith("token_embedding.weight") for k in keys)
    has_openclip = f"{OPENCLIP_PREFIX}token_embedding.weight" in sd
    has_vae = f"{VAE_PREFIX}encoder.conv_in.weight" in sd
    if not has_vae:
        raise SourceError(f"{where} has no VAE ({VAE_PREFIX}encoder.conv_in.weight missing); expected {_EXPECTED}")
    if not (has_clip or has_openclip):
        raise SourceError(
            f"{where} has no text encoder ({CLIP_PREFIX}text_model.* or {OPENCLIP_PREFIX}*); expected {_EXPECTED}")
    proj_in = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    linear = bool(proj_in) and len(sd[proj_in[0]].shape) == 2
    if has_openclip:
        family, text_kind = "sd2", "openclip"
        evidence = f"OpenCLIP text encoder ({OPENCLIP_PREFIX}*)"
    else:
        family, text_kind = "sd1", "clip"
        evidence = f"CLIP text encoder ({CLIP_PREFIX}text_model.*)"
    evidence += ", linear proj_in" if linear else ", conv proj_in"
    ctx = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx:
        evidence += f", {sd[ctx[0]].shape[1]}-wide cross-attention"
    return family, evidence, text_kind


# ------------------------------------------------------------------ prediction type
def _from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    for key in ("modelspec.prediction_type", "prediction_type"):
        v = metadata.get(key)
        if v:
            try:
                return normalize_prediction_type(v), f"metadata {key}={v}"
            except InvalidArgument:
                pass
    v = metadata.get("ss_v_parameterization")
    if v is not None and str(v).strip().lower() in ("true", "1"):
        return "v_prediction", f"metadata ss_v_parameterization={v}"
    arch = metadata.get("modelspec.architecture", "")
    if arch:
        a = arch.lower()
        if a.startswith("stable-diffusion-v2-768-v") or a.endswith("-v") or "v-prediction" in a:
            return "v_prediction", f"metadata modelspec.architecture={arch}"
        if a.startswith(("stable-diffusion-v1", "stable-diffusion-v2-512")):
            return "epsilon", f"metadata modelspec.architecture={arch}"
    return None, ""


def _from_filename(filename: str) -> str | None:
    stem = Path(filename).name.lower()
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", stem)
    if re.search(r"(^|[^a-z0-9])(v[-_]?pred(iction)?|768[-_]?v)([^a-z0-9]|$)", stem):
        return "v_prediction"
    if re.search(r"(^|[^a-z0-9])(eps|epsilon)([^a-z0-9]|$)", stem):
        return "epsilon"
    if re.search(r"(^|[^0-9])768([^0-9]|$)", stem):
        return "v_prediction"
    if re.search(r"(^|[^0-9])512([^0-9]|$)", stem) or re.search(r"(^|[^a-z])base([^a-z]|$)", stem):
        return "epsilon"
    return None


def decide_prediction_type(family: str, *, sd: Mapping | None = None, filename: str | None = None,
                           metadata: Mapping[str, str] | None = None, global_step: int | None = None,
                           override: str | None = None, arch: str | None = None) -> tuple[str, str]:
    """(prediction_type, decided_by) for a single-file checkpoint; see the module docstring."""
    override = normalize_prediction_type(override)
    if override:
        return override, "override (prediction_type argument)"
    if arch:
        return ARCHES[check_arch(arch)][1], f"arch {arch}"
    if sd is not None and "v_pred" in sd:
        return "v_prediction", "v_pred marker tensor in the checkpoint"
    pt, why = _from_metadata(metadata or {})
    if pt:
        return pt, why
    if family == "sd1":
        return "epsilon", "default for SD 1.x (as diffusers); pass prediction_type='v_prediction' for a v-model"
    if global_step == 875000:
        return "epsilon", "global_step 875000 (SD 2.0-base, as diffusers)"
    if global_step == 110000:
        return "v_prediction", "global_step 110000 (SD 2.1-v, as diffusers)"
    if filename:
        pt = _from_filename(filename)
        if pt:
            return pt, f"file name {Path(filename).name!r}"
    if global_step is not None:
        return "v_prediction", f"global_step {global_step} (as diffusers: SD 2.x -> v_prediction unless 875000)"
    return "v_prediction", ("default for SD 2.x (as diffusers: 768-v); pass prediction_type='epsilon' "
                            "for a 512 base model")


def default_size_for(family: str, prediction_type: str, metadata: Mapping[str, str] | None = None
                     ) -> tuple[int, str]:
    res = (metadata or {}).get("modelspec.resolution")
    if res:
        m = re.match(r"^\s*(\d+)\s*[x×,]\s*(\d+)\s*$", str(res))
        if m and int(m[1]) > 0 and int(m[1]) % 8 == 0:
            return int(m[1]), f"metadata modelspec.resolution={res}"
    if family == "sd2" and prediction_type == "v_prediction":
        return 768, "SD 2.x v_prediction (768-v)"
    return 512, f"{'SD 1.x' if family == 'sd1' else 'SD 2.x epsilon (base)'}"


# ------------------------------------------------------------------ configs from shapes
def unet_config_from_checkpoint(sd: Mapping, family: str, base: Mapping, default_size: int,
                                vae_scale: int, where: str = "the checkpoint") -> dict:
    p = UNET_PREFIX
    keys = [k for k in sd if k.startswith(p)]
    conv_in = _shape(sd, p + "input_blocks.0.0.weight")
    if not conv_in or len(conv_in) != 4:
        raise SourceError(f"{where}: UNet conv_in ({p}input_blocks.0.0.weight) is missing or not a conv weight")
    in_ch = conv_in[1]
    if in_ch not in (4, 9):  # 9: an inpainting UNet (export/detect.py unet_kind); 4: text-to-image
        what = {5: "a depth-conditioned model: export its diffusers folder, which holds the depth estimator",
                7: "an upscaler", 8: "an instruct-pix2pix model"}
        raise SourceError(
            f"{where}: the UNet takes {in_ch} input channels ({what.get(in_ch, 'not a text-to-image model')}); "
            "expected 4 (text-to-image SD 1.x/2.x) or 9 (inpainting)")
    if any(k.startswith(p + "label_emb") for k in keys):
        raise SourceError(f"{where}: the UNet has class/label embeddings (an upscaler or unCLIP model); "
                          "expected a text-to-image SD 1.x/2.x UNet")
    n_in = len(_indices(keys, re.escape(p) + r"input_blocks\.(\d+)\."))
    downs = _indices(keys, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    if not downs:
        raise SourceError(f"{where}: no UNet downsampling layers found; expected {_EXPECTED}")
    L = downs[0] - 1
    levels = len(downs) + 1
    if L < 1 or n_in != 1 + levels * L + len(downs) or downs != [(i + 1) * (L + 1) for i in range(levels - 1)]:
        raise SourceError(f"{where}: unexpected UNet block layout ({n_in} input blocks, downsamplers at {downs})")
    block_out, down_types, depths = [], [], []   # depths: transformer blocks per level (1 without attention)
    for i in range(levels):
        b = i * (L + 1) + 1
        w = _shape(sd, f"{p}input_blocks.{b}.0.out_layers.3.weight")
        if not w:
            raise SourceError(f"{where}: UNet resnet {p}input_blocks.{b}.0 is missing")
        block_out.append(w[0])
        if f"{p}input_blocks.{b}.1.proj_in.weight" in sd:
            down_types.append("CrossAttnDownBlock2D")
            depths.append(len(_indices(keys, re.escape(f"{p}input_blocks.{b}.1.transformer_blocks.") + r"(\d+)\.")))
        else:
            down_types.append("DownBlock2D")
            depths.append(None)
    up_types = []
    for i in range(levels):
        b = i * (L + 1)
        up_types.append("CrossAttnUpBlock2D" if f"{p}output_blocks.{b}.1.proj_in.weight" in sd else "UpBlock2D")
    if "CrossAttnDownBlock2D" not in down_types:
        raise SourceError(f"{where}: the UNet has no cross-attention; expected a text-conditioned SD 1.x/2.x UNet")
    if f"{p}middle_block.1.proj_in.weight" not in sd:
        raise SourceError(f"{where}: the UNet middle block has no attention; expected an SD 1.x/2.x UNet")
    proj = _shape(sd, f"{p}middle_block.1.proj_in.weight")
    linear = len(proj) == 2
    ctx_keys = [k for k in keys if k.endswith("attn2.to_k.weight")]
    context_dim = sd[ctx_keys[0]].shape[1]
    if any(sd[k].shape[1] != context_dim for k in ctx_keys):
        raise SourceError(f"{where}: the UNet's cross-attention widths differ between blocks")
    att_widths = [c for c, t in zip(block_out, down_types) if t.startswith("CrossAttn")] + [block_out[-1]]
    if family == "sd1":
        heads: Any = SD1_UNET_HEADS
        bad = [c for c in att_widths if c % SD1_UNET_HEADS]
        if bad:
            raise SourceError(f"{where}: SD 1.x UNets have {SD1_UNET_HEADS} attention heads, which needs widths "
                              f"divisible by {SD1_UNET_HEADS}; found {bad}")
    else:
        bad = [c for c in att_widths if c % SD2_HEAD_CHANNELS]
        if bad:
            raise SourceError(f"{where}: SD 2.x UNets have {SD2_HEAD_CHANNELS}-channel attention heads, which needs "
                              f"attention widths divisible by {SD2_HEAD_CHANNELS}; found {bad}")
        heads = [max(1, c // SD2_HEAD_CHANNELS) for c in block_out]
    groups = int(base.get("norm_num_groups", NORM_GROUPS))
    bad = [c for c in block_out if c % groups]
    if bad:
        raise SourceError(f"{where}: UNet widths must be divisible by {groups} (GroupNorm groups); found {block_out}")
    out_ch = _shape(sd, p + "out.2.weight")
    att_depths = [d for d in depths if d is not None]
    cfg = copy.deepcopy(dict(base))
    cfg.update(
        in_channels=in_ch,
        out_channels=out_ch[0] if out_ch else 4,
        block_out_channels=block_out,
        layers_per_block=L,
        down_block_types=down_types,
        up_block_types=up_types,
        cross_attention_dim=int(context_dim),
        attention_head_dim=heads,
        use_linear_projection=linear,
        transformer_layers_per_block=(att_depths[0] if len(set(att_depths)) == 1
                                      else [d if d is not None else 1 for d in depths]),
        sample_size=default_size // vae_scale,
    )
    return cfg


def vae_config_from_checkpoint(sd: Mapping, base: Mapping, default_size: int, where: str = "the checkpoint") -> dict:
    p = VAE_PREFIX
    keys = [k for k in sd if k.startswith(p)]
    levels = _indices(keys, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise SourceError(f"{where}: no VAE encoder blocks ({p}encoder.down.N.*); expected {_EXPECTED}")
    block_out = []
    for i in levels:
        w = _shape(sd, f"{p}encoder.down.{i}.block.0.conv2.weight")
        if not w:
            raise SourceError(f"{where}: VAE block {p}encoder.down.{i}.block.0 is missing")
        block_out.append(w[0])
    L = len(_indices(keys, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    dec_in = _shape(sd, p + "decoder.conv_in.weight")
    enc_in = _shape(sd, p + "encoder.conv_in.weight")
    dec_out = _shape(sd, p + "decoder.conv_out.weight")
    if not (dec_in and enc_in and dec_out):
        raise SourceError(f"{where}: the VAE decoder is incomplete (decoder.conv_in / conv_out missing)")
    groups = int(base.get("norm_num_groups", NORM_GROUPS))
    if any(c % groups for c in block_out):
        raise SourceError(f"{where}: VAE widths must be divisible by {groups} (GroupNorm groups); found {block_out}")
    cfg = copy.deepcopy(dict(base))
    cfg.update(
        in_channels=enc_in[1], out_channels=dec_out[0], latent_channels=dec_in[1],
        block_out_channels=block_out, layers_per_block=L,
        down_block_types=["DownEncoderBlock2D"] * len(block_out),
        up_block_types=["UpDecoderBlock2D"] * len(block_out),
        sample_size=default_size,
    )
    return cfg


def text_config_from_checkpoint(sd: Mapping, text_kind: str, base: Mapping, where: str = "the checkpoint") -> dict:
    keys = list(sd.keys())
    if text_kind == "clip":
        prefix = next(pp for pp in (CLIP_PREFIX + "text_model.", CLIP_PREFIX)
                      if pp + "embeddings.token_embedding.weight" in sd)
        tok = _shape(sd, prefix + "embeddings.token_embedding.weight")
        pos = _shape(sd, prefix + "embeddings.position_embedding.weight")
        n = len(_indices(keys, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
        fc1 = _shape(sd, prefix + "encoder.layers.0.mlp.fc1.weight")
        layers = n
    else:
        prefix = OPENCLIP_PREFIX
        tok = _shape(sd, prefix + "token_embedding.weight")
        pos = _shape(sd, prefix + "positional_embedding")
        n = len(_indices(keys, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
        fc1 = _shape(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight")
        # SD 2.x uses the penultimate layer: its files hold one block more than the
        # text encoder runs (diffusers drops resblocks.23), unless already pruned.
        layers = n if n == int(base["num_hidden_layers"]) else n - 1
    if not (tok and pos and fc1) or layers < 1:
        raise SourceError(f"{where}: the text encoder is incomplete (embeddings or layers missing)")
    vocab, hidden = tok
    if hidden % CLIP_HEAD_DIM:
        raise SourceError(f"{where}: text encoder width {hidden} is not a multiple of {CLIP_HEAD_DIM} "
                          f"(CLIP heads are {CLIP_HEAD_DIM} wide); cannot derive its attention heads")
    cfg = copy.deepcopy(dict(base))
    cfg.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=pos[0],
               num_hidden_layers=layers, intermediate_size=fc1[0], num_attention_heads=hidden // CLIP_HEAD_DIM)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(cfg.get(k), int) and cfg[k] >= vocab:
            cfg[k] = None
    return cfg


# ------------------------------------------------------------------ everything
def detect_checkpoint(sd: Mapping, *, filename: str | None = None, metadata: Mapping[str, str] | None = None,
                      global_step: int | None = None, prediction_type: str | None = None,
                      arch: str | None = None, where: str | None = None) -> CheckpointInfo:
    """Family, prediction type, default size and adapted configs of an original-layout state dict."""
    where = where or (str(filename) if filename else "the checkpoint")
    family, evidence, text_kind = detect_family(sd, where)
    arch = check_arch(arch)
    if arch and ARCHES[arch][0] != family:
        raise SourceError(f"{where} is {family.upper()} ({evidence}) but arch={arch} ({ARCHES[arch][0].upper()}) "
                          "was requested")
    pt, pt_why = decide_prediction_type(family, sd=sd, filename=filename, metadata=metadata,
                                        global_step=global_step, override=prediction_type, arch=arch)
    if arch and not prediction_type:
        size, size_why = ARCHES[arch][2], f"arch {arch}"
    else:
        size, size_why = default_size_for(family, pt, metadata)
    name = vendored_name(family, pt)
    base = load_vendored(name)
    vae_cfg = vae_config_from_checkpoint(sd, base["vae"], size, where)
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if size % vae_scale:
        raise SourceError(f"{where}: default size {size} is not a multiple of the VAE downscale {vae_scale}")
    unet_cfg = unet_config_from_checkpoint(sd, family, base["unet"], size, vae_scale, where)
    text_cfg = text_config_from_checkpoint(sd, text_kind, base["text_encoder"], where)
    notes = []
    if global_step == 110000 and family == "sd2":
        unet_cfg["upcast_attention"] = True
        notes.append("global_step 110000: upcast_attention=True (as diffusers)")
    if unet_cfg["cross_attention_dim"] != text_cfg["hidden_size"]:
        raise SourceError(
            f"{where}: the UNet's cross-attention expects {unet_cfg['cross_attention_dim']}-wide text embeddings "
            f"but the text encoder is {text_cfg['hidden_size']} wide")
    kind, kind_why = unet_kind(unet_cfg["in_channels"], vae_cfg["latent_channels"], where)
    if kind != "txt2img":
        notes.append(kind_why)
    n_ema = sum(1 for k in sd if k.startswith(EMA_PREFIX))
    extract_ema = n_ema > 100
    if extract_ema:
        notes.append(f"the checkpoint holds EMA weights ({n_ema} tensors): using them for the UNet")
    return CheckpointInfo(family, evidence, pt, pt_why, size, size_why, name, unet_cfg, vae_cfg, text_cfg,
                          text_kind, extract_ema, notes)


# ------------------------------------------------------------------ what the UNet takes
# The UNet's input channels against the VAE's latent channels C say what the model is for:
#   C          text-to-image (also inpaints, by blending the known region back each step)
#   2C + 1     inpainting: latents, the mask, the masked image's latents (diffusers' StableDiffusionInpaintPipeline)
#   C + 1      depth-to-image: latents, the depth map (StableDiffusionDepth2ImgPipeline)
UNET_KINDS = ("txt2img", "inpaint", "depth")


def unet_kind(in_channels: int, latent_channels: int, where: str = "the model") -> tuple[str, str]:
    """(kind, evidence) from the UNet's input channels; SourceError for anything else."""
    cin, c = int(in_channels), int(latent_channels)
    if cin == c:
        return "txt2img", f"the UNet takes the {c} latent channels"
    if cin == 2 * c + 1:
        return "inpaint", (f"an inpainting UNet: {cin} input channels = {c} latents + 1 mask + "
                           f"{c} masked-image latents")
    if cin == c + 1:
        return "depth", f"a depth-conditioned UNet: {cin} input channels = {c} latents + 1 depth map"
    raise SourceError(f"{where}: the UNet takes {cin} input channels but the VAE makes {c} latent channels; "
                      f"expected {c} (text-to-image), {2 * c + 1} (inpainting) or {c + 1} (depth)")


def family_from_diffusers(unet_config: Mapping, text_config: Mapping) -> tuple[str, str]:
    """(family, evidence) for a diffusers folder, from its component configs."""
    linear = bool(unet_config.get("use_linear_projection", False))
    act = text_config.get("hidden_act", "quick_gelu")
    ctx = unet_config.get("cross_attention_dim")
    if linear:
        return "sd2", f"unet use_linear_projection=True, text encoder {act}, {ctx}-wide cross-attention"
    return "sd1", f"unet use_linear_projection=False, text encoder {act}, {ctx}-wide cross-attention"
