"""Loading an export source into torch modules: the first half of ``cpuflow export``.

:func:`load_source` accepts

* a local **diffusers folder** (``model_index.json`` + ``unet/ vae/ text_encoder/
  tokenizer/ scheduler/``): SD 1.x, SD 2.x base (epsilon), SD 2.x 768 (v_prediction),
  any widths their configs allow;
* a **single-file checkpoint** in the original Stable Diffusion layout: a
  ``.safetensors`` always, a pickle (``.ckpt``/``.pt``) only with
  ``allow_pickle=True`` (read in a child process, see :mod:`.safe_load`). The
  family, prediction type and sizes are detected (:mod:`.detect`) and the
  components built offline from the vendored configs in ``export/configs/``;
* a **Hugging Face hub id** (``"stabilityai/sd-turbo"``): downloaded with
  ``huggingface_hub.snapshot_download`` (safetensors only), then loaded like a folder;
* ``random_weights=True`` with ``arch`` in ``sd15 / sd21 / sd21-v / sdxl / x4-upscaler`` and no source:
  the full-size architecture with seeded random weights (latency work only).

SDXL diffusers folders (and ``arch="sdxl"``) are handed to :mod:`.sources_sdxl`, x4 upscaler
folders (and ``arch="x4-upscaler"``) to :mod:`.sources_upscale`.

Weights are always read with :mod:`.safe_load` (content-sniffed, safetensors or a
sandboxed ``weights_only`` unpickle) and loaded STRICTLY: a missing, extra or
mis-shaped tensor is a :class:`~cpuflow.errors.SourceError`, never a silent
random init. Models come back in float32, eval mode.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cpuflow.errors import CpuflowError, InvalidArgument, MissingDependency, SourceError
from cpuflow.manifest import sha256_file

from . import checkpoint_keys as ck
from . import detect
from . import safe_load

ProgressFn = Callable[[str], Any]

TOKENIZER_REQUIRED = ("vocab.json", "merges.txt")
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = TOKENIZER_REQUIRED + TOKENIZER_CONFIGS

# Where a tokenizer for a single-file checkpoint may already sit in the HF cache.
HUB_TOKENIZERS: dict[str, list[tuple[str, str]]] = {
    "sd1": [("openai/clip-vit-large-patch14", ""),
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
            ("runwayml/stable-diffusion-v1-5", "tokenizer"),
            ("CompVis/stable-diffusion-v1-4", "tokenizer")],
    "sd2": [("stabilityai/stable-diffusion-2-1", "tokenizer"),
            ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer"),
            ("stabilityai/stable-diffusion-2-base", "tokenizer"),
            ("stabilityai/sd-turbo", "tokenizer")],
}

_HUB_ALLOW = ["model_index.json", "scheduler/*", "tokenizer/*", "unet/*.json", "vae/*.json", "text_encoder/*.json",
              "unet/diffusion_pytorch_model*.safetensors", "vae/diffusion_pytorch_model*.safetensors",
              "text_encoder/model*.safetensors",
              "tokenizer_2/*", "text_encoder_2/*.json", "text_encoder_2/model*.safetensors",  # SDXL
              "depth_estimator/*.json", "depth_estimator/model*.safetensors", "feature_extractor/*",  # depth
              "low_res_scheduler/*"]  # the x4 upscaler
_HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.pb", "*.h5"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class LoadedSource:
    text_encoder: Any            # transformers.CLIPTextModel, eval mode, float32
    unet: Any                    # diffusers.UNet2DConditionModel
    vae: Any                     # diffusers.AutoencoderKL
    tokenizer_dir: Path          # vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler_config: dict       # as scheduler_config.json, prediction_type set
    family: str                  # "sd1" | "sd2"
    prediction_type: str         # "epsilon" | "v_prediction"
    default_size: int            # pixels
    name: str
    source: dict                 # {"kind", "name", "sha256"}
    random_weights: bool
    # How each fact was decided (family / prediction type / size evidence, notes).
    detection: dict = field(default_factory=dict)
    # The tiny autoencoder (AutoencoderTiny) added with --taesd, and where it came from (export/taesd.py).
    taesd: Any = None
    taesd_source: dict | None = None
    # What the UNet takes (export/detect.py unet_kind): "txt2img", "inpaint" (9 channels) or "depth" (5).
    unet_kind: str = "txt2img"
    # depth models: the DPT depth estimator (transformers DPTForDepthEstimation) and the preprocessing
    # its feature extractor does, as the manifest records it (export/depth.py)
    depth_estimator: Any = None
    depth_preprocess: dict | None = None


# ------------------------------------------------------------------ small helpers
def _say(progress: ProgressFn | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _need_torch():
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"the export stage needs torch, diffusers and transformers ({e.name} is missing): "
                                "pip install 'cpuflow[export]'") from None


def _digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over the sorted (relative path, file sha256) of the files that were read."""
    h = hashlib.sha256()
    for f in sorted({Path(f) for f in files}, key=lambda f: _rel(root, f)):
        h.update(f"{_rel(root, f)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _rel(root: Path, f: Path) -> str:
    try:
        return Path(os.path.abspath(f)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return Path(f).name


_TEMP_DIRS: list[str] = []


def _temp_dir(prefix: str) -> Path:
    d = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(d)
    return Path(d)


@atexit.register
def _cleanup_temp_dirs() -> None:  # pragma: no cover - runs at interpreter exit
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{what}: {path} is not a JSON object")
    return data


# ------------------------------------------------------------------ building modules
@contextlib.contextmanager
def _empty_weights():
    """Parameters on the meta device (no random init of 860M parameters); buffers stay real."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is part of the export extra
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def _quiet_from_config(cls, config: dict):
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()      # unused keys such as _name_or_path are fine
    try:
        return cls.from_config(config)
    finally:
        dlogging.set_verbosity(level)


def _build(component: str, config: dict, *, empty: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ctx = _empty_weights() if empty else contextlib.nullcontext()
    try:
        with ctx:
            if component == "unet":
                return _quiet_from_config(UNet2DConditionModel, config)
            if component == "vae":
                return _quiet_from_config(AutoencoderKL, config)
            cfg = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",)}
            cfg.pop("torch_dtype", None)
            cfg.pop("dtype", None)
            return CLIPTextModel(CLIPTextConfig(**cfg))
    except CpuflowError:
        raise
    except Exception as e:
        raise SourceError(f"cannot build the {component} from its config: {type(e).__name__}: {e}") from None


def _load_strict(model, sd: dict, component: str, where: str):
    import torch

    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k, found, exp = wrong[0]
            parts.append(f"{len(wrong)} tensors have the wrong shape (e.g. {k}: expected {list(exp)}, found {list(found)})")
        if missing:
            parts.append(f"{len(missing)} expected tensors are missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SourceError(f"the {component} weights in {where} do not fit the {component} architecture: "
                          + "; ".join(parts))
    fixed = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            v = v.to(torch.float32)
        v = v.contiguous()
        # A view into a file mapping (safetensors) or a larger buffer: give it its own,
        # aligned memory. Unaligned weights make oneDNN/MKL pick other kernels, so the
        # same weights would give (slightly) different results than a fresh module.
        if v.data_ptr() % 64 or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()
        fixed[k] = v
    model.load_state_dict(fixed, strict=True, assign=True)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # pragma: no cover - guarded by the key check above
            raise SourceError(f"the {component} tensor {n} was not loaded from {where}")
    model.eval()
    return model


# ------------------------------------------------------------------ tokenizer
def _tokenizer_candidates_in(d: Path) -> dict[str, Path]:
    return {f: d / f for f in TOKENIZER_FILES if (d / f).is_file()}


def _cached_tokenizer(family: str) -> tuple[dict[str, Path], str] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for repo, sub in HUB_TOKENIZERS.get(family, []):
        found: dict[str, Path] = {}
        for fn in TOKENIZER_FILES:
            try:
                r = try_to_load_from_cache(repo, f"{sub}/{fn}" if sub else fn)
            except Exception:
                r = None
            if isinstance(r, str) and os.path.isfile(r):
                found[fn] = Path(r)
        if all(f in found for f in TOKENIZER_REQUIRED):
            return found, f"{repo}{'/' + sub if sub else ''} (Hugging Face cache)"
    return None


def _no_tokenizer_error(family: str, why: str) -> SourceError:
    ref = ("openai/clip-vit-large-patch14" if family == "sd1" else "stabilityai/stable-diffusion-2-1 (tokenizer/)")
    return SourceError(
        f"no CLIP tokenizer for this {family} model: {why}. Pass --tokenizer DIR (tokenizer=DIR), a folder "
        f"with vocab.json and merges.txt, e.g. those of {ref}",
        hint="offline: `pip download --no-deps open-clip-torch` carries the CLIP BPE "
             "(open_clip/bpe_simple_vocab_16e6.txt.gz), which cpuflow.tokenizer.write_clip_tokenizer_files "
             "turns into such a folder")


def _assemble_tokenizer(files: dict[str, Path], family_configs: dict, vocab_size: int | None,
                        where: str) -> Path:
    """A folder with all four tokenizer files: the given one if complete, else a temp
    folder with the given files plus the family's vendored configs for the missing ones."""
    try:
        vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
        if not isinstance(vocab, dict) or not vocab:
            raise ValueError("not a token -> id object")
        if not files["merges.txt"].read_text(encoding="utf-8").strip():
            raise ValueError("merges.txt is empty")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"the tokenizer in {where} is not a CLIP BPE tokenizer ({e})") from None
    if vocab_size is not None and max(int(i) for i in vocab.values()) >= vocab_size:
        raise SourceError(f"the tokenizer in {where} has {len(vocab)} tokens but the text encoder only knows "
                          f"{vocab_size}: wrong tokenizer for this model")
    dirs = {p.parent for p in files.values()}
    if len(dirs) == 1 and all(f in files for f in TOKENIZER_FILES):
        return next(iter(dirs))
    out = _temp_dir("cpuflow-tokenizer-")
    for fn in TOKENIZER_FILES:
        if fn in files:
            shutil.copyfile(files[fn], out / fn)
        else:
            key = "tokenizer_config" if fn == "tokenizer_config.json" else "special_tokens_map"
            (out / fn).write_text(json.dumps(family_configs[key], indent=2) + "\n")
    return out


def _special_tokens_from_config(cfg: dict, fallback: dict) -> dict:
    out = dict(fallback)
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(k)
        if isinstance(v, dict) and "content" in v:
            v = {kk: vv for kk, vv in v.items() if kk != "__type"}
        if isinstance(v, (str, dict)):
            out[k] = v
    return out


def _from_tokenizer_json(d: Path, configs: dict) -> dict[str, Path] | None:
    """vocab.json + merges.txt (+ configs) from a ``tokenizer.json``: what transformers >= 5
    writes for a CLIP tokenizer (no vocab.json / merges.txt)."""
    tj = d / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"a {model.get('type')} model, not BPE")
        vocab = {str(k): int(v) for k, v in model["vocab"].items()}
        for t in data.get("added_tokens") or []:
            vocab.setdefault(str(t["content"]), int(t["id"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{tj} is not a CLIP BPE tokenizer ({e})") from None
    out = _temp_dir("cpuflow-tokenizer-")
    (out / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                               ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    cfg = dict(configs["tokenizer_config"])
    if (d / "tokenizer_config.json").is_file():
        cfg = _read_json(d / "tokenizer_config.json", "tokenizer config")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (d / "special_tokens_map.json").is_file():
        shutil.copyfile(d / "special_tokens_map.json", out / "special_tokens_map.json")
    else:
        stm = _special_tokens_from_config(cfg, configs["special_tokens_map"])
        (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")
    return {fn: out / fn for fn in TOKENIZER_FILES}


def _tokenizer_files(d: Path, configs: dict) -> dict[str, Path] | None:
    files = _tokenizer_candidates_in(d)
    if all(f in files for f in TOKENIZER_REQUIRED):
        return files
    return _from_tokenizer_json(d, configs)


def _resolve_tokenizer(tokenizer: str | Path | None, own: Path | None, family: str, vendored: str,
                       vocab_size: int | None, progress: ProgressFn | None) -> tuple[Path, str]:
    configs = detect.load_vendored(vendored)
    if tokenizer is not None:
        t = Path(tokenizer).expanduser()
        if not t.is_dir():
            raise SourceError(f"tokenizer folder {t} does not exist" if not t.exists()
                              else f"tokenizer {t} is not a folder (pass the folder holding vocab.json and merges.txt)")
        files = _tokenizer_files(t, configs)
        if files is None:
            have = _tokenizer_candidates_in(t)
            raise SourceError(f"tokenizer folder {t} lacks "
                              f"{', '.join(f for f in TOKENIZER_REQUIRED if f not in have)} (and has no tokenizer.json)")
        return _assemble_tokenizer(files, configs, vocab_size, str(t)), f"tokenizer argument {t}"
    if own is not None and own.is_dir():
        files = _tokenizer_files(own, configs)
        if files is not None:
            return _assemble_tokenizer(files, configs, vocab_size, str(own)), f"{own}"
    cached = _cached_tokenizer(family)
    if cached:
        files, label = cached
        _say(progress, f"using the tokenizer of {label}")
        return _assemble_tokenizer(files, configs, vocab_size, label), label
    why = ("the folder's tokenizer/ has neither vocab.json + merges.txt nor tokenizer.json" if own is not None
           else "single-file checkpoints carry none and none was found in the Hugging Face cache")
    raise _no_tokenizer_error(family, why)


# ------------------------------------------------------------------ diffusers folders
_WEIGHT_BASES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                 "depth_estimator": ("model", "pytorch_model"),
                 "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}


def _component_weight_files(folder: Path, component: str) -> list[Path]:
    d = folder / component
    if not d.is_dir():
        raise SourceError(f"{folder} is not a complete diffusers folder: {component}/ is missing")
    bases = _WEIGHT_BASES[component]
    for ext in ("safetensors", "bin"):
        for variant in ("", ".fp16"):
            for b in bases:
                f = d / f"{b}{variant}.{ext}"
                if f.is_file():
                    return [f]
                idx = d / f"{b}{variant}.{ext}.index.json"
                if idx.is_file():
                    wm = _read_json(idx, f"{component} weights index").get("weight_map", {})
                    shards = sorted({d / str(v) for v in wm.values()})
                    if not shards:
                        raise SourceError(f"{idx} lists no weight files")
                    for s in shards:
                        if not s.resolve().is_relative_to(d.resolve()):
                            raise SourceError(f"{idx} points outside its folder ({s})")
                    return shards
    raise SourceError(f"{d} has no weights (expected {bases[0]}.safetensors)")


def _read_component(folder: Path, component: str, allow_pickle: bool, progress: ProgressFn | None
                    ) -> tuple[dict, list[Path]]:
    files = _component_weight_files(folder, component)
    sd: dict = {}
    for f in files:
        wf = safe_load.load_state_dict(f, allow_pickle=allow_pickle, progress=progress)
        sd.update(safe_load.unwrap_state_dict(wf.state_dict))
    return sd, files


def _load_folder(folder: Path, *, kind: str, name: str, allow_pickle: bool, prediction_type: str | None,
                 tokenizer, arch: str | None, progress: ProgressFn | None) -> LoadedSource:
    _need_torch()
    index = _read_json(folder / "model_index.json", "diffusers folder")
    cls = str(index.get("_class_name", ""))
    from . import sources_upscale
    if sources_upscale.is_upscale_index(index):
        return sources_upscale.load_folder(folder, kind=kind, name=name, allow_pickle=allow_pickle,
                                           prediction_type=prediction_type, tokenizer=tokenizer, arch=arch,
                                           progress=progress)
    if "XL" in cls or "text_encoder_2" in index:
        from . import sources_sdxl
        return sources_sdxl.load_folder(folder, kind=kind, name=name, allow_pickle=allow_pickle,
                                        prediction_type=prediction_type, tokenizer=tokenizer, arch=arch,
                                        progress=progress)
    for comp in ("unet", "vae", "text_encoder", "scheduler"):
        if comp not in index and not (folder / comp).is_dir():
            raise SourceError(f"{folder} is not a Stable Diffusion pipeline folder: no {comp} in model_index.json")
    used: list[Path] = [folder / "model_index.json"]
    unet_cfg = _read_json(folder / "unet" / "config.json", "unet config")
    vae_cfg = _read_json(folder / "vae" / "config.json", "vae config")
    text_cfg = _read_json(folder / "text_encoder" / "config.json", "text encoder config")
    used += [folder / "unet" / "config.json", folder / "vae" / "config.json", folder / "text_encoder" / "config.json"]
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(sched_path, "scheduler config")
    used.append(sched_path)
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise SourceError(f"{folder}: the unet is a {unet_cfg.get('_class_name')}; expected UNet2DConditionModel")
    unet_kind, kind_why = detect.unet_kind(int(unet_cfg.get("in_channels", 4)),
                                           int(vae_cfg.get("latent_channels", 4)), str(folder))
    if unet_cfg.get("addition_embed_type") or unet_cfg.get("class_embed_type"):
        raise SourceError(f"{folder}: the UNet has extra embeddings (SDXL/upscaler); expected an SD 1.x/2.x UNet")
    family, fam_why = detect.family_from_diffusers(unet_cfg, text_cfg)
    arch = detect.check_arch(arch)
    if arch and detect.ARCHES[arch][0] != family:
        raise SourceError(f"{folder} is {family.upper()} ({fam_why}) but arch={arch} was requested")
    if prediction_type:
        pt, pt_why = detect.normalize_prediction_type(prediction_type), "override (prediction_type argument)"
    elif arch:
        pt, pt_why = detect.ARCHES[arch][1], f"arch {arch}"
    else:
        raw = scheduler_config.get("prediction_type")
        pt = detect.normalize_prediction_type(raw) if raw else "epsilon"
        pt_why = (f"scheduler_config.json prediction_type={raw}" if raw
                  else "scheduler_config.json has no prediction_type (diffusers default: epsilon)")
    if pt not in detect.PREDICTION_TYPES:  # pragma: no cover - normalize_prediction_type guarantees it
        raise SourceError(f"{folder}: unsupported prediction type {pt}")
    scheduler_config = dict(scheduler_config, prediction_type=pt)
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    default_size = int(unet_cfg.get("sample_size", 64)) * vae_scale
    if isinstance(unet_cfg.get("sample_size"), (list, tuple)):
        default_size = int(unet_cfg["sample_size"][0]) * vae_scale
    ctx_dim = unet_cfg.get("cross_attention_dim")
    if ctx_dim is not None and int(ctx_dim) != int(text_cfg.get("hidden_size", ctx_dim)):
        raise SourceError(f"{folder}: the UNet expects {ctx_dim}-wide text embeddings but the text encoder is "
                          f"{text_cfg.get('hidden_size')} wide")
    _say(progress, f"detected {family} ({fam_why}); prediction type {pt} ({pt_why}); default size {default_size}"
                   + ("" if unet_kind == "txt2img" else f"; {kind_why}"))

    vendored = detect.vendored_name(family, pt)
    tok_dir, tok_why = _resolve_tokenizer(tokenizer, folder / "tokenizer", family, vendored,
                                          int(text_cfg.get("vocab_size", 49408)), progress)

    models = {}
    for comp, cfg in (("unet", unet_cfg), ("vae", vae_cfg), ("text_encoder", text_cfg)):
        _say(progress, f"loading {comp}")
        sd, files = _read_component(folder, comp, allow_pickle, progress)
        used += files
        model = _build(comp, cfg, empty=True)
        if comp == "vae":
            sd = ck.normalize_vae_keys(sd)
        if comp == "text_encoder":
            sd = ck.normalize_text_encoder_keys(sd, model.state_dict().keys())
        models[comp] = _load_strict(model, sd, comp, str(folder / comp))
        del sd
    if tok_dir.resolve().is_relative_to(folder.resolve()):
        used += [tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
    depth_estimator = depth_preprocess = None
    if unet_kind == "depth":
        from .depth import load_depth_estimator
        _say(progress, "loading depth_estimator")
        depth_estimator, depth_preprocess, depth_files = load_depth_estimator(folder, allow_pickle, progress)
        used += depth_files
    _say(progress, "hashing the source files")
    sha = _digest(folder, used)
    detection = {"family": family, "family_decided_by": fam_why, "prediction_type": pt,
                 "prediction_type_decided_by": pt_why, "default_size": default_size,
                 "default_size_decided_by": f"unet sample_size x VAE downscale {vae_scale}",
                 "tokenizer": tok_why, "unet_kind": unet_kind, "unet_kind_decided_by": kind_why, "notes": []}
    return LoadedSource(models["text_encoder"], models["unet"], models["vae"], tok_dir, scheduler_config, family,
                       pt, default_size, name, {"kind": kind, "name": name, "sha256": sha}, False, detection,
                       unet_kind=unet_kind, depth_estimator=depth_estimator, depth_preprocess=depth_preprocess)


# ------------------------------------------------------------------ single files
def _load_single_file(path: Path, *, allow_pickle: bool, prediction_type: str | None, tokenizer,
                      arch: str | None, progress: ProgressFn | None) -> LoadedSource:
    _need_torch()
    wf = safe_load.load_state_dict(path, allow_pickle=allow_pickle, progress=progress)
    sd = safe_load.unwrap_state_dict(wf.state_dict)
    global_step = wf.global_step
    if global_step is None and str(wf.metadata.get("global_step", "")).isdigit():
        global_step = int(wf.metadata["global_step"])
    info = detect.detect_checkpoint(sd, filename=path.name, metadata=wf.metadata, global_step=global_step,
                                    prediction_type=prediction_type, arch=arch, where=str(path))
    _say(progress, f"detected {info.family} ({info.family_decided_by}); prediction type {info.prediction_type} "
                   f"({info.prediction_type_decided_by}); default size {info.default_size}")
    for note in info.notes:
        _say(progress, note)
    vendored = detect.load_vendored(info.vendored)
    tok_dir, tok_why = _resolve_tokenizer(tokenizer, None, info.family, info.vendored,
                                          info.text_config["vocab_size"], progress)
    known = (ck.UNET_PREFIX, ck.VAE_PREFIX, ck.CLIP_PREFIX, ck.OPENCLIP_PREFIX, ck.EMA_PREFIX)
    ignored = sorted(k for k in sd if not k.startswith(known))

    _say(progress, "converting unet")
    unet_sd = ck.unet_to_diffusers(sd, info.unet_config, extract_ema=info.extract_ema)
    unet = _load_strict(_build("unet", info.unet_config, empty=True), unet_sd, "unet", str(path))
    del unet_sd
    _say(progress, "converting vae")
    vae_sd = ck.vae_to_diffusers(sd, info.vae_config)
    vae = _load_strict(_build("vae", info.vae_config, empty=True), vae_sd, "vae", str(path))
    del vae_sd
    _say(progress, "converting text encoder")
    text_encoder = _build("text_encoder", info.text_config, empty=True)
    if info.text_kind == "clip":
        te_sd = ck.clip_to_diffusers(sd)
    else:
        te_sd = ck.openclip_to_diffusers(sd, info.text_config["num_hidden_layers"], info.text_config["hidden_size"])
    te_sd = ck.normalize_text_encoder_keys(te_sd, text_encoder.state_dict().keys())
    text_encoder = _load_strict(text_encoder, te_sd, "text_encoder", str(path))
    del te_sd, sd, wf

    scheduler_config = dict(vendored["scheduler"], prediction_type=info.prediction_type)
    _say(progress, "hashing the checkpoint")
    sha = sha256_file(path)
    detection = info.summary()
    detection["tokenizer"] = tok_why
    detection["global_step"] = global_step
    detection["ignored_keys"] = len(ignored)
    if ignored:
        detection["notes"].append(f"ignored {len(ignored)} tensors outside the model (e.g. {', '.join(ignored[:3])})")
    name = path.stem
    unet_kind, kind_why = detect.unet_kind(info.unet_config["in_channels"], info.vae_config["latent_channels"],
                                           str(path))
    detection["unet_kind"], detection["unet_kind_decided_by"] = unet_kind, kind_why
    return LoadedSource(text_encoder, unet, vae, tok_dir, scheduler_config, info.family, info.prediction_type,
                       info.default_size, name, {"kind": "single_file", "name": path.name, "sha256": sha}, False,
                       detection, unet_kind=unet_kind)


# ------------------------------------------------------------------ hub
def _hub_download(repo_id: str, progress: ProgressFn | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise MissingDependency("downloading from the hub needs huggingface_hub: pip install 'cpuflow[export]'") from None
    _say(progress, f"downloading {repo_id} from the Hugging Face hub (safetensors only)")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE))
        missing = []
        for comp in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if (path / "text_encoder_2").is_dir() else ()):
            try:
                _component_weight_files(path, comp)
            except SourceError:
                missing.append(comp)
        if missing:  # only fp16 variants published: fetch those
            _say(progress, f"{repo_id} has no float32 weights for {', '.join(missing)}; fetching the fp16 variant")
            pats = [f"{c}/*.fp16.safetensors" for c in missing] + [f"{c}/*.fp16.safetensors.index.json" for c in missing]
            path = Path(snapshot_download(repo_id, allow_patterns=_HUB_ALLOW + pats,
                                          ignore_patterns=[p for p in _HUB_IGNORE if p != "*.fp16.*"]))
    except GatedRepoError:
        raise SourceError(f"could not download {repo_id}: the repository is gated (accept its license on the hub "
                          "and log in with `hf auth login`), or download it yourself and pass the folder") from None
    except RepositoryNotFoundError:
        raise SourceError(f"could not download {repo_id}: no such model on the Hugging Face hub (or it is private); "
                          "check the id, or pass a local folder or file") from None
    except RevisionNotFoundError:
        raise SourceError(f"could not download {repo_id}: revision not found") from None
    except CpuflowError:
        raise
    except Exception as e:
        raise SourceError(f"could not download {repo_id}: offline? download it yourself and pass the folder "
                          f"({type(e).__name__}; there is no local file or folder of that name either)") from None
    return path


def looks_like_hub_id(source: str) -> bool:
    s = str(source)
    if s.startswith((".", "/", "~")) or "\\" in s or s.count("/") != 1:
        return False
    if re.search(r"\.(safetensors|ckpt|pt|pth|bin)$", s, re.I):
        return False
    return bool(_HUB_ID.match(s))


# ------------------------------------------------------------------ random weights
def _load_random(arch: str, seed: int, prediction_type: str | None, tokenizer, progress: ProgressFn | None
                 ) -> LoadedSource:
    _need_torch()

    if arch == "sdxl":
        from . import sources_sdxl
        return sources_sdxl.load_random(seed, prediction_type, tokenizer, progress)
    if arch == "x4-upscaler":
        from . import sources_upscale
        return sources_upscale.load_random(seed, prediction_type, tokenizer, progress)
    family, pt, size, vendored = detect.ARCHES[arch]
    if prediction_type:
        pt = detect.normalize_prediction_type(prediction_type)
    cfgs = detect.load_vendored(vendored)
    for comp, changes in detect.ARCH_OVERRIDES.get(arch, {}).items():
        cfgs[comp] = dict(changes) if comp == "scheduler" else {**cfgs[comp], **changes}
    tok_dir, tok_why = _resolve_tokenizer(tokenizer, None, family, vendored, cfgs["text_encoder"]["vocab_size"],
                                          progress)
    models = build_random_modules(arch, seed, cfgs, ("unet", "vae", "text_encoder"), _build, progress)
    scheduler_config = dict(cfgs["scheduler"], prediction_type=pt)
    record, detection = random_source_record(arch, seed, cfgs, family=family, prediction_type=pt,
                                             overridden=bool(prediction_type), size=size, tokenizer=tok_why)
    unet_kind, _ = detect.unet_kind(cfgs["unet"]["in_channels"], cfgs["vae"]["latent_channels"], f"arch {arch}")
    return LoadedSource(models["text_encoder"], models["unet"], models["vae"], tok_dir, scheduler_config, family, pt,
                        size, f"random-{arch}", record, True, detection, unet_kind=unet_kind)


def build_random_modules(arch: str, seed: int, cfgs: dict, components: tuple[str, ...], build,
                         progress: ProgressFn | None) -> dict[str, Any]:
    """``build(component, config, empty=False)`` for each of ``components`` in eval mode,
    component i seeded ``seed * 1000 + i`` (the same weights for the same seed on every
    run, without touching the caller's torch RNG). Every --random-weights arch builds here."""
    import torch

    models = {}
    with torch.random.fork_rng(devices=[]):
        for i, comp in enumerate(components):
            _say(progress, f"building {comp} ({arch}) with random weights, seed {seed}")
            torch.manual_seed(int(seed) * 1000 + i)
            models[comp] = build(comp, cfgs[comp], empty=False).eval()
    return models


def random_source_record(arch: str, seed: int, cfgs: dict, *, family: str, prediction_type: str, overridden: bool,
                         size: int, **tokenizers: str) -> tuple[dict, dict]:
    """(source record, detection) of a --random-weights model: its identity is the hash of
    the arch, the seed and the configs; ``tokenizers``: where each tokenizer came from
    (``tokenizer``, and SDXL's ``tokenizer_2``)."""
    ident = hashlib.sha256(json.dumps({"arch": arch, "seed": int(seed), "configs": cfgs},
                                      sort_keys=True).encode()).hexdigest()
    detection = {"family": family, "family_decided_by": f"arch {arch}", "prediction_type": prediction_type,
                 "prediction_type_decided_by": "override (prediction_type argument)" if overridden
                 else f"arch {arch}", "default_size": size, "default_size_decided_by": f"arch {arch}",
                 **tokenizers, "seed": int(seed), "notes": ["random weights: images are noise"]}
    return {"kind": "random", "name": arch, "sha256": ident}, detection


# ------------------------------------------------------------------ entry point
def load_source(source: str | Path | None, *, allow_pickle: bool = False, prediction_type: str | None = None,
                tokenizer: str | Path | None = None, arch: str | None = None, random_weights: bool = False,
                seed: int = 0, progress: ProgressFn | None = None) -> LoadedSource:
    """Load an export source (see the module docstring) into a :class:`LoadedSource`.

    ``prediction_type`` overrides what the source says or detection decides;
    ``tokenizer`` is a folder with ``vocab.json`` + ``merges.txt`` (needed for
    single files unless the HF cache holds one); ``arch`` picks the random
    architecture, and for other sources asserts the family (and implies its
    prediction type unless ``prediction_type`` is given). ``progress`` gets one
    message per stage."""
    prediction_type = detect.normalize_prediction_type(prediction_type)
    arch = detect.check_arch(arch)
    if random_weights:
        if source is not None and str(source) != "":
            raise InvalidArgument("random_weights builds an architecture from scratch: pass no source, only arch")
        if arch is None:
            raise InvalidArgument(f"random_weights needs arch: one of {', '.join(detect.ARCHES)}")
        return _load_random(arch, seed, prediction_type, tokenizer, progress)
    if source is None or str(source).strip() == "":
        raise InvalidArgument("no source given: pass a diffusers folder, a .safetensors/.ckpt file or a hub id "
                              "(or random_weights=True with arch)")
    p = Path(source).expanduser()
    if p.exists():
        if p.is_dir():
            if (p / "model_index.json").is_file():
                _say(progress, f"reading diffusers folder {p}")
                return _load_folder(p, kind="diffusers_folder", name=p.resolve().name, allow_pickle=allow_pickle,
                                    prediction_type=prediction_type, tokenizer=tokenizer, arch=arch,
                                    progress=progress)
            hint = ""
            weights = [f.name for f in p.iterdir() if f.suffix.lower() in (".safetensors", ".ckpt")]
            if weights:
                hint = f" (it holds {', '.join(sorted(weights)[:3])}: pass that file instead)"
            raise SourceError(f"{p} is a folder but not a diffusers folder: no model_index.json{hint}")
        return _load_single_file(p, allow_pickle=allow_pickle, prediction_type=prediction_type, tokenizer=tokenizer,
                                 arch=arch, progress=progress)
    if isinstance(source, str) and looks_like_hub_id(source):
        folder = _hub_download(source, progress)
        return _load_folder(folder, kind="hub", name=source, allow_pickle=False, prediction_type=prediction_type,
                            tokenizer=tokenizer, arch=arch, progress=progress)
    raise SourceError(f"no such file or folder: {p}")
