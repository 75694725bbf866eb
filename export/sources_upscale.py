"""Loading the Stable Diffusion x4 upscaler (``StableDiffusionUpscalePipeline``) into torch modules.

What :mod:`.sources` does for SD 1.x / 2.x, for the upscaler's layout:

* a local **diffusers folder** whose ``model_index.json`` says
  ``StableDiffusionUpscalePipeline`` (or lists ``low_res_scheduler``): ``unet/`` (7 input
  channels: 4 latent + the 3-channel low-res image; ``num_class_embeds``: the noise level is
  its class label), ``vae/`` (downscale 4, its own scaling factor 0.08333), ``text_encoder/``
  (SD 2's OpenCLIP), ``tokenizer/``, ``scheduler/`` (the sampler's) and ``low_res_scheduler/``
  (the DDPM schedule that noises the low-res image); hub ids load the same way;
* ``random_weights`` with ``arch="x4-upscaler"``: the full architecture from the configs
  vendored in ``export/configs/x4-upscaler`` with seeded random weights (latency work).

The manifest gets an ``upscaler`` block (export/sources_upscale.py ``manifest_extras``):
the low-res scheduler's config, ``max_noise_level``, the image channels and the x4 factor.
Weights are read with :mod:`.safe_load` and loaded strictly, like the SD loaders.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpuflow.errors import SourceError

from . import checkpoint_keys as ck
from . import detect
from . import sources as src

FAMILY = "x4-upscaler"
ARCH = "x4-upscaler"
CONFIG_DIR = detect.CONFIGS_DIR / "x4-upscaler"
PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
# diffusers' StableDiffusionUpscalePipeline.__init__ forces the VAE's scaling factor to this
# value (with a deprecation warning) whatever its config says; the export does the same.
SCALING_FACTOR = 0.08333
DEFAULT_MAX_NOISE_LEVEL = 350      # StableDiffusionUpscalePipeline's default
DEFAULT_NOISE_LEVEL = 20           # StableDiffusionUpscalePipeline.__call__'s default
DEFAULT_GUIDANCE = 9.0             # likewise


@dataclass
class UpscaleLoadedSource(src.LoadedSource):
    """A :class:`~export.sources.LoadedSource` plus the low-res noise schedule."""
    low_res_scheduler_config: dict = field(default_factory=dict)
    max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL

    def manifest_extras(self, staging: Path) -> dict:
        image_channels = int(self.unet.config.in_channels) - int(self.vae.config.latent_channels)
        return {
            "upscaler": {
                "low_res_scheduler": dict(self.low_res_scheduler_config),
                "max_noise_level": int(self.max_noise_level),
                "default_noise_level": DEFAULT_NOISE_LEVEL,
                "image_channels": image_channels,
                # the output is the VAE's downscale times the input: the latents have the input's size
                "factor": 2 ** (len(self.vae.config.block_out_channels) - 1),
            },
            "defaults": {"guidance": DEFAULT_GUIDANCE},
        }


def is_upscale_index(index: dict) -> bool:
    return str(index.get("_class_name", "")) == PIPELINE_CLASS or "low_res_scheduler" in index


def load_vendored() -> dict[str, dict]:
    files = {
        "model_index": "model_index.json", "unet": "unet/config.json", "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json", "scheduler": "scheduler/scheduler_config.json",
        "low_res_scheduler": "low_res_scheduler/scheduler_config.json",
        "tokenizer_config": "tokenizer/tokenizer_config.json",
        "special_tokens_map": "tokenizer/special_tokens_map.json",
    }
    return {k: json.loads((CONFIG_DIR / rel).read_text()) for k, rel in files.items()}


def check_configs(where: str, unet_cfg: dict, vae_cfg: dict, te_cfg: dict, low_res_cfg: dict) -> None:
    """Refuse what the upscaler export does not handle, naming both sides."""
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise SourceError(f"{where}: the unet is a {unet_cfg.get('_class_name')}; expected UNet2DConditionModel")
    latent = int(vae_cfg.get("latent_channels", 4))
    cin = int(unet_cfg.get("in_channels", 4))
    if cin <= latent:
        raise SourceError(f"{where}: the UNet takes {cin} input channels, no more than the VAE's {latent} latent "
                          "channels: not an upscaler UNet (latents + low-res image)")
    if not unet_cfg.get("num_class_embeds") or unet_cfg.get("class_embed_type") is not None:
        raise SourceError(f"{where}: the UNet has no class embedding table (num_class_embeds); the x4 upscaler "
                          "conditions on the noise level through it")
    if unet_cfg.get("addition_embed_type"):
        raise SourceError(f"{where}: the UNet has an addition embedding ({unet_cfg.get('addition_embed_type')}); "
                          "not an x4 upscaler UNet")
    cross = unet_cfg.get("cross_attention_dim")
    if cross is not None and int(cross) != int(te_cfg.get("hidden_size", cross)):
        raise SourceError(f"{where}: the UNet expects {cross}-wide text embeddings but the text encoder is "
                          f"{te_cfg.get('hidden_size')} wide")
    if int(unet_cfg.get("out_channels", latent)) != latent:
        raise SourceError(f"{where}: the UNet makes {unet_cfg.get('out_channels')} channels but the VAE takes "
                          f"{latent} latent channels")
    if low_res_cfg.get("trained_betas") is not None:
        raise SourceError(f"{where}: a low_res_scheduler with trained_betas is not supported")


def _fix_scaling_factor(vae, notes: list[str]) -> None:
    if getattr(vae.config, "scaling_factor", None) != SCALING_FACTOR:
        notes.append(f"the VAE's scaling_factor {getattr(vae.config, 'scaling_factor', None)} was set to "
                     f"{SCALING_FACTOR}, as StableDiffusionUpscalePipeline does")
        vae.register_to_config(scaling_factor=SCALING_FACTOR)


def _prediction(prediction_type: str | None, scheduler_config: dict) -> tuple[str, str]:
    if prediction_type:
        return detect.normalize_prediction_type(prediction_type), "override (prediction_type argument)"
    raw = scheduler_config.get("prediction_type")
    pt = detect.normalize_prediction_type(raw) if raw else "epsilon"
    return pt, (f"scheduler_config.json prediction_type={raw}" if raw else "diffusers default: epsilon")


def _default_size(unet_cfg: dict, vae_cfg: dict) -> int:
    """The output size of an input at the UNet's sample size (128 -> 512 for the real model)."""
    s = unet_cfg.get("sample_size", 128)
    if isinstance(s, (list, tuple)):
        s = s[0]
    return int(s) * 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0])) - 1)


def load_folder(folder: Path, *, kind: str, name: str, allow_pickle: bool, prediction_type: str | None,
                tokenizer, arch: str | None, progress) -> UpscaleLoadedSource:
    src._need_torch()
    index = src._read_json(folder / "model_index.json", "diffusers folder")
    cls = str(index.get("_class_name", "")) or "lists low_res_scheduler"
    for comp in ("unet", "vae", "text_encoder", "scheduler", "low_res_scheduler"):
        if not (folder / comp).is_dir():
            raise SourceError(f"{folder} is not a complete x4 upscaler folder: {comp}/ is missing")
    arch = detect.check_arch(arch)
    if arch and arch != ARCH:
        raise SourceError(f"{folder} is an x4 upscaler (model_index.json {cls}) but arch={arch} was requested")
    used: list[Path] = [folder / "model_index.json"]
    cfgs = {}
    for comp in ("unet", "vae", "text_encoder"):
        cfgs[comp] = src._read_json(folder / comp / "config.json", f"{comp} config")
        used.append(folder / comp / "config.json")
    scheds = {}
    for comp in ("scheduler", "low_res_scheduler"):
        path = folder / comp / "scheduler_config.json"
        scheds[comp] = src._read_json(path, f"{comp} config")
        used.append(path)
    check_configs(str(folder), cfgs["unet"], cfgs["vae"], cfgs["text_encoder"], scheds["low_res_scheduler"])
    pt, pt_why = _prediction(prediction_type, scheds["scheduler"])
    size = _default_size(cfgs["unet"], cfgs["vae"])
    src._say(progress, f"detected the x4 upscaler (model_index.json {cls}); prediction type {pt} ({pt_why})")
    tok_dir, tok_why = src._resolve_tokenizer(tokenizer, folder / "tokenizer", "sd2", "sd21-base",
                                              int(cfgs["text_encoder"].get("vocab_size", 49408)), progress)
    models = {}
    for comp in ("unet", "vae", "text_encoder"):
        src._say(progress, f"loading {comp}")
        sd, files = src._read_component(folder, comp, allow_pickle, progress)
        used += files
        model = src._build(comp, cfgs[comp], empty=True)
        if comp == "vae":
            sd = ck.normalize_vae_keys(sd)
        if comp == "text_encoder":
            sd = ck.normalize_text_encoder_keys(sd, model.state_dict().keys())
        models[comp] = src._load_strict(model, sd, comp, str(folder / comp))
        del sd
    notes: list[str] = []
    _fix_scaling_factor(models["vae"], notes)
    if tok_dir.resolve().is_relative_to(folder.resolve()):
        used += [tok_dir / f for f in src.TOKENIZER_FILES if (tok_dir / f).is_file()]
    src._say(progress, "hashing the source files")
    sha = src._digest(folder, used)
    detection = {"family": FAMILY, "family_decided_by": f"model_index.json {cls}", "prediction_type": pt,
                 "prediction_type_decided_by": pt_why, "default_size": size,
                 "default_size_decided_by": "unet sample_size x VAE downscale", "tokenizer": tok_why, "notes": notes}
    return UpscaleLoadedSource(models["text_encoder"], models["unet"], models["vae"], tok_dir,
                              dict(scheds["scheduler"], prediction_type=pt), FAMILY, pt, size, name,
                              {"kind": kind, "name": name, "sha256": sha}, False, detection,
                              low_res_scheduler_config=scheds["low_res_scheduler"],
                              max_noise_level=int(index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)))


def load_random(seed: int, prediction_type: str | None, tokenizer, progress) -> UpscaleLoadedSource:
    """The full x4 upscaler architecture (vendored configs) with seeded random weights."""
    src._need_torch()

    cfgs = load_vendored()
    pt, _ = _prediction(prediction_type, cfgs["scheduler"])
    tok_dir, tok_why = src._resolve_tokenizer(tokenizer, None, "sd2", "sd21-base", cfgs["text_encoder"]["vocab_size"],
                                              progress)
    models = src.build_random_modules(ARCH, seed, cfgs, ("unet", "vae", "text_encoder"), src._build, progress)
    size = _default_size(cfgs["unet"], cfgs["vae"])
    record, detection = src.random_source_record(ARCH, seed, cfgs, family=FAMILY, prediction_type=pt,
                                                 overridden=bool(prediction_type), size=size, tokenizer=tok_why)
    return UpscaleLoadedSource(models["text_encoder"], models["unet"], models["vae"], tok_dir,
                              dict(cfgs["scheduler"], prediction_type=pt), FAMILY, pt, size, f"random-{ARCH}",
                              record, True, detection,
                              low_res_scheduler_config=cfgs["low_res_scheduler"],
                              max_noise_level=int(cfgs["model_index"]["max_noise_level"]))
