"""Loading an SDXL source (Stable Diffusion XL base) into torch modules.

What :mod:`.sources` does for SD 1.x / 2.x, for the SDXL layout:

* a local **diffusers folder** whose ``model_index.json`` says
  ``StableDiffusionXLPipeline`` (or lists ``text_encoder_2``): ``unet/``, ``vae/``,
  ``text_encoder/`` (CLIPTextModel), ``text_encoder_2/`` (CLIPTextModelWithProjection),
  ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``; hub ids load the same way;
* ``random_weights`` with ``arch="sdxl"``: the full SDXL base architecture from the
  configs vendored in ``export/configs/sdxl`` with seeded random weights (latency work).

Single-file SDXL checkpoints are refused with a clear message (convert them to a
diffusers folder first). Weights are read with :mod:`.safe_load` and loaded
strictly, like the SD loaders. The refiner (no ``text_encoder``) is not supported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpuflow.errors import CpuflowError, SourceError

from . import checkpoint_keys as ck
from . import detect
from . import sources as src

FAMILY = "sdxl"
ARCH = "sdxl"
CONFIG_DIR = detect.CONFIGS_DIR / "sdxl"
DEFAULT_GUIDANCE = 5.0
DEFAULT_AESTHETIC_SCORE = 6.0            # diffusers' StableDiffusionXLImg2ImgPipeline defaults
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass
class SDXLLoadedSource(src.LoadedSource):
    """A :class:`~export.sources.LoadedSource` plus SDXL's second text encoder and tokenizer."""
    text_encoder_2: Any = None                   # transformers.CLIPTextModelWithProjection
    tokenizer_2_dir: Path | None = None
    pipeline_config: dict = field(default_factory=dict)   # force_zeros_for_empty_prompt, requires_aesthetics_score

    def manifest_extras(self, staging: Path) -> dict:
        """What the manifest holds beyond the SD keys: the second tokenizer (copied
        into ``staging/tokenizer_2``), the pipeline's prompt / time-id options and
        the generation defaults diffusers uses for SDXL."""
        from .build import copy_tokenizer

        te2 = self.text_encoder_2.config
        tok2 = copy_tokenizer(Path(self.tokenizer_2_dir), staging / "tokenizer_2",
                              int(te2.max_position_embeddings))
        # guidance 5: StableDiffusionXLPipeline's default (SD's is 7.5)
        return {"tokenizer_2": tok2, "sdxl": dict(self.pipeline_config), "defaults": {"guidance": DEFAULT_GUIDANCE}}


def is_sdxl_index(index: dict) -> bool:
    cls = str(index.get("_class_name", ""))
    return "XL" in cls or "text_encoder_2" in index


def load_vendored() -> dict[str, dict]:
    files = {
        "model_index": "model_index.json", "unet": "unet/config.json", "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    return {k: json.loads((CONFIG_DIR / rel).read_text()) for k, rel in files.items()}


def _text_model(component: str, config: dict, *, empty: bool):
    """CLIPTextModel (text_encoder) or CLIPTextModelWithProjection (text_encoder_2)."""
    if component != "text_encoder_2":
        return src._build(component, config, empty=empty)
    import contextlib

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype",
                                                                                   "dtype")}
    try:
        with (src._empty_weights() if empty else contextlib.nullcontext()):
            return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    except CpuflowError:
        raise
    except Exception as e:
        raise SourceError(f"cannot build the text_encoder_2 from its config: {type(e).__name__}: {e}") from None


def _pipeline_config(index: dict) -> dict:
    return {
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
        "aesthetic_score": DEFAULT_AESTHETIC_SCORE,
        "negative_aesthetic_score": DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    }


def _check_configs(where: str, unet_cfg: dict, vae_cfg: dict, te_cfg: dict, te2_cfg: dict, index: dict) -> int:
    """Refuse what the SDXL export does not handle; return the number of time ids."""
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise SourceError(f"{where}: the unet is a {unet_cfg.get('_class_name')}; expected UNet2DConditionModel")
    kind, kind_why = detect.unet_kind(int(unet_cfg.get("in_channels", 4)), int(vae_cfg.get("latent_channels", 4)),
                                      where)
    if kind == "depth":
        raise SourceError(f"{where}: {kind_why}; SDXL depth-to-image is not supported")
    if unet_cfg.get("addition_embed_type") != "text_time":
        raise SourceError(f"{where}: the UNet's addition_embed_type is {unet_cfg.get('addition_embed_type')!r}; "
                          "an SDXL UNet has 'text_time'")
    if vae_cfg.get("latents_mean") is not None or vae_cfg.get("latents_std") is not None:
        raise SourceError(f"{where}: a VAE with latents_mean/latents_std is not supported yet")
    proj = int(te2_cfg.get("projection_dim", te2_cfg.get("hidden_size", 0)))
    width = int(te_cfg.get("hidden_size", 0)) + int(te2_cfg.get("hidden_size", 0))
    cross = unet_cfg.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cross is not None and int(cross) != width:
        raise SourceError(f"{where}: the UNet expects {cross}-wide text embeddings but the two text encoders "
                          f"give {te_cfg.get('hidden_size')} + {te2_cfg.get('hidden_size')} = {width}")
    td = int(unet_cfg.get("addition_time_embed_dim") or 0)
    total = int(unet_cfg.get("projection_class_embeddings_input_dim") or 0)
    if td <= 0 or (total - proj) % td or (total - proj) // td not in (5, 6):
        raise SourceError(f"{where}: projection_class_embeddings_input_dim {total} does not fit "
                          f"text_embeds {proj} + time ids x addition_time_embed_dim {td}")
    n_ids = (total - proj) // td
    wants = 5 if index.get("requires_aesthetics_score") else 6
    if n_ids != wants:
        raise SourceError(f"{where}: the UNet takes {n_ids} time ids but requires_aesthetics_score is "
                          f"{bool(index.get('requires_aesthetics_score'))} (which means {wants})")
    return n_ids


def _default_size(unet_cfg: dict, vae_cfg: dict) -> tuple[int, int]:
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    s = unet_cfg.get("sample_size", 128)
    if isinstance(s, (list, tuple)):
        s = s[0]
    return int(s) * vae_scale, vae_scale


def _tokenizer_2(tokenizer_2, own: Path | None, fallback: Path, vocab_size: int, progress) -> tuple[Path, str]:
    """tokenizer_2: the folder's own (or the tokenizer_2 argument); else the first
    tokenizer's BPE files with SDXL's tokenizer_2 configs (the same vocabulary,
    padded with "!")."""
    configs = detect.load_vendored("sd21-base")     # CLIP BPE configs padding with "!", as tokenizer_2
    if tokenizer_2 is not None or (own is not None and own.is_dir()
                                   and src._tokenizer_files(own, configs) is not None):
        return src._resolve_tokenizer(tokenizer_2, own, "sd2", "sd21-base", vocab_size, progress)
    # only the BPE files are passed, so the configs come from the vendored ones (never the first tokenizer's)
    files = {f: fallback / f for f in src.TOKENIZER_REQUIRED}
    d = src._assemble_tokenizer(files, configs, vocab_size, str(fallback))
    return d, f"{fallback} (BPE) with SDXL's tokenizer_2 configs (pad '!')"


def load_folder(folder: Path, *, kind: str, name: str, allow_pickle: bool, prediction_type: str | None,
                tokenizer, arch: str | None, progress) -> SDXLLoadedSource:
    src._need_torch()
    index = src._read_json(folder / "model_index.json", "diffusers folder")
    cls = str(index.get("_class_name", ""))
    if cls and cls not in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                           "StableDiffusionXLInpaintPipeline"):
        raise SourceError(f"{folder} is a {cls}; cpuflow exports SDXL base pipelines "
                          "(StableDiffusionXLPipeline) only")
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if not (folder / comp).is_dir():
            what = " (an SDXL refiner? only SDXL base is supported)" if comp == "text_encoder" else ""
            raise SourceError(f"{folder} is not a complete SDXL pipeline folder: {comp}/ is missing{what}")
    arch = detect.check_arch(arch)
    if arch and arch != ARCH:
        raise SourceError(f"{folder} is SDXL (model_index.json {cls or 'lists text_encoder_2'}) "
                          f"but arch={arch} was requested")
    used: list[Path] = [folder / "model_index.json"]
    cfgs = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        cfgs[comp] = src._read_json(folder / comp / "config.json", f"{comp} config")
        used.append(folder / comp / "config.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = src._read_json(sched_path, "scheduler config")
    used.append(sched_path)
    _check_configs(str(folder), cfgs["unet"], cfgs["vae"], cfgs["text_encoder"], cfgs["text_encoder_2"], index)
    if prediction_type:
        pt, pt_why = detect.normalize_prediction_type(prediction_type), "override (prediction_type argument)"
    else:
        raw = scheduler_config.get("prediction_type")
        pt = detect.normalize_prediction_type(raw) if raw else "epsilon"
        pt_why = f"scheduler_config.json prediction_type={raw}" if raw else "diffusers default: epsilon"
    scheduler_config = dict(scheduler_config, prediction_type=pt)
    size, vae_scale = _default_size(cfgs["unet"], cfgs["vae"])
    src._say(progress, f"detected sdxl (model_index.json {cls or 'lists text_encoder_2'}); prediction type {pt} "
                       f"({pt_why}); default size {size}")

    tok_dir, tok_why = src._resolve_tokenizer(tokenizer, folder / "tokenizer", "sd1", "sd15",
                                              int(cfgs["text_encoder"].get("vocab_size", 49408)), progress)
    tok2_dir, tok2_why = _tokenizer_2(None, folder / "tokenizer_2", tok_dir,
                                      int(cfgs["text_encoder_2"].get("vocab_size", 49408)), progress)
    models = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        src._say(progress, f"loading {comp}")
        sd, files = src._read_component(folder, comp, allow_pickle, progress)
        used += files
        model = _text_model(comp, cfgs[comp], empty=True)
        if comp == "vae":
            sd = ck.normalize_vae_keys(sd)
        if comp.startswith("text_encoder"):
            head = {k: sd.pop(k) for k in list(sd) if k.endswith("text_projection.weight")}  # outside text_model
            sd = ck.normalize_text_encoder_keys(sd, model.state_dict().keys())
            for v in head.values():
                sd["text_projection.weight"] = v
        models[comp] = src._load_strict(model, sd, comp, str(folder / comp))
        del sd
    for d in (tok_dir, tok2_dir):
        if d.resolve().is_relative_to(folder.resolve()):
            used += [d / f for f in src.TOKENIZER_FILES if (d / f).is_file()]
    src._say(progress, "hashing the source files")
    sha = src._digest(folder, used)
    detection = {"family": FAMILY, "family_decided_by": f"model_index.json {cls or 'lists text_encoder_2'}",
                 "prediction_type": pt, "prediction_type_decided_by": pt_why, "default_size": size,
                 "default_size_decided_by": f"unet sample_size x VAE downscale {vae_scale}",
                 "tokenizer": tok_why, "tokenizer_2": tok2_why, "notes": []}
    unet_kind, kind_why = detect.unet_kind(int(cfgs["unet"].get("in_channels", 4)),
                                           int(cfgs["vae"].get("latent_channels", 4)), str(folder))
    detection["unet_kind"], detection["unet_kind_decided_by"] = unet_kind, kind_why
    return SDXLLoadedSource(models["text_encoder"], models["unet"], models["vae"], tok_dir, scheduler_config, FAMILY,
                           pt, size, name, {"kind": kind, "name": name, "sha256": sha}, False, detection,
                           unet_kind=unet_kind, text_encoder_2=models["text_encoder_2"], tokenizer_2_dir=tok2_dir,
                           pipeline_config=_pipeline_config(index))


def load_random(seed: int, prediction_type: str | None, tokenizer, progress) -> SDXLLoadedSource:
    """The full SDXL base architecture (vendored configs) with seeded random weights."""
    src._need_torch()

    cfgs = load_vendored()
    pt = detect.normalize_prediction_type(prediction_type) if prediction_type else "epsilon"
    tok_dir, tok_why = src._resolve_tokenizer(tokenizer, None, "sd1", "sd15", cfgs["text_encoder"]["vocab_size"],
                                              progress)
    tok2_dir, tok2_why = _tokenizer_2(None, None, tok_dir, cfgs["text_encoder_2"]["vocab_size"], progress)
    models = src.build_random_modules(ARCH, seed, cfgs, ("unet", "vae", "text_encoder", "text_encoder_2"),
                                      _text_model, progress)
    size, _ = _default_size(cfgs["unet"], cfgs["vae"])
    record, detection = src.random_source_record(ARCH, seed, cfgs, family=FAMILY, prediction_type=pt,
                                                 overridden=bool(prediction_type), size=size, tokenizer=tok_why,
                                                 tokenizer_2=tok2_why)
    return SDXLLoadedSource(models["text_encoder"], models["unet"], models["vae"], tok_dir,
                           dict(cfgs["scheduler"], prediction_type=pt), FAMILY, pt, size, f"random-{ARCH}",
                           record, True, detection,
                           text_encoder_2=models["text_encoder_2"], tokenizer_2_dir=tok2_dir,
                           pipeline_config=_pipeline_config(cfgs["model_index"]))
