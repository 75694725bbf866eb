"""Tiny, seeded, random Stable-Diffusion-architecture models for tests (no downloads).

Everything is built in-process with diffusers / transformers and is fast (well
under a second per kind). Three kinds:

=========  ============  ==============================  =====================
kind       family        prediction / scheduler          text encoder
=========  ============  ==============================  =====================
``sd1``    SD 1.x-like   epsilon, PNDM (SD 1.5 values)   CLIP, 128 wide, 2 heads, quick_gelu
``sd2``    SD 2.x-like   epsilon, PNDM (SD 2.1-base)     OpenCLIP-style, 192 wide, 3 heads, gelu
``sd2-v``  SD 2.x-like   v_prediction, DDIM (SD 2.1)     as sd2
=========  ============  ==============================  =====================

Sizes (all kinds: 64x64 images, 8x8x4 latents, VAE downscale 8, 77 tokens):

* UNet: ``block_out_channels`` (32, 64) for sd1 / (64, 128) for sd2, 1 layer per
  block, attention at level 0 and in the middle (CrossAttnDownBlock2D, DownBlock2D /
  UpBlock2D, CrossAttnUpBlock2D), ``sample_size`` 8, 32 GroupNorm groups;
  sd1: conv proj_in, ``attention_head_dim`` 8 (= 8 heads, as SD 1.5);
  sd2: ``use_linear_projection``, ``attention_head_dim`` [1, 2] (64-channel heads, as SD 2.x).
* VAE: ``block_out_channels`` (32, 32, 64, 64), 1 layer per block, 4 latent channels,
  scaling factor 0.18215.
* Text encoder: 2 layers, 77 positions, vocabulary = the tiny tokenizer's.
* Tokenizer: a CLIP-format BPE folder (vocab.json with the 256 byte symbols, the
  same + ``</w>``, merges for a few common words, ``<|startoftext|>``,
  ``<|endoftext|>``; merges.txt with the ``#version`` header; tokenizer_config.json,
  special_tokens_map.json; sd2 pads with ``!`` as SD 2.x does).

These sizes follow the conventions the single-file loader relies on (heads of
64 channels for the text encoders and SD 2.x UNets, 8 heads for SD 1.x UNets,
widths divisible by 32), so ``save_tiny_single_file`` + ``load_source`` rebuilds
exactly the same modules. Every parameter is perturbed after init (norm weights
are not all ones), so a mis-mapped tensor cannot go unnoticed.

API::

    tiny_sd_components(kind="sd1", seed=0, tokenizer_dir=None) -> TinyComponents
        (unet, vae, text_encoder, tokenizer_dir, scheduler_config)
    write_tiny_tokenizer(path, kind="sd1") -> Path
    save_tiny_diffusers_folder(path, kind="sd1", seed=0) -> Path
        loads with StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    save_tiny_single_file(path, kind="sd1", fmt="safetensors"|"ckpt", seed=0, metadata=True,
                          global_step="auto") -> Path
        the SAME weights in the original SD layout (model.diffusion_model.*, first_stage_model.*,
        cond_stage_model.transformer.text_model.* / cond_stage_model.model.*)
    tiny_original_state_dict(kind="sd1", seed=0) -> dict
    component_state_dicts(components) -> {"unet": ..., "vae": ..., "text_encoder": ...}
    assert_same_weights(a_module_or_dict, b_module_or_dict, what="")
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cpuflow.tokenizer import bytes_to_unicode  # one byte table for the tokenizer and the tests

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

TINY_KINDS = ("sd1", "sd2", "sd2-v")
TINY_SIZE = 64                 # pixels
TINY_LATENT = 8                # latent pixels (VAE downscale 8)
TINY_MAX_LENGTH = 77

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORDS = ("a photo of an astronaut riding horse on mars the cat dog red car in painting landscape mountain "
          "city at night portrait woman man beautiful blue sky sunset forest river with high quality detailed "
          "and style by oil digital art").split()

_SCHEDULERS = {
    "sd1": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
}
_SCHEDULERS["sd2"] = dict(_SCHEDULERS["sd1"])
_SCHEDULERS["sd2-v"] = dict(_SCHEDULERS["sd1"], _class_name="DDIMScheduler", prediction_type="v_prediction")

_PREDICTION = {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v_prediction"}
_FAMILY = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2"}


def _check_kind(kind: str) -> str:
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny kind {kind!r}: one of {TINY_KINDS}")
    return kind


# ------------------------------------------------------------------ tokenizer


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-format vocab (byte symbols, the same + </w>, merge results, BOS, EOS) and merges."""
    byte_syms = list(bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms]
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    for w in _WORDS:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:   # merge left to right: every intermediate is a token
            a, b = syms[0], syms[1]
            merged = a + b
            if (a, b) not in merges:
                merges.append((a, b))
            if merged not in seen:
                vocab_list.append(merged)
                seen.add(merged)
            syms = [merged] + syms[2:]
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def tiny_vocab_size() -> int:
    return len(tiny_vocab_and_merges()[0])


def write_tiny_tokenizer(path: str | os.PathLike, kind: str = "sd1") -> Path:
    """Write a CLIP-format tokenizer folder that CLIPTokenizer (and cpuflow's tokenizer) load."""
    _check_kind(kind)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    pad = "!" if _FAMILY[kind] == "sd2" else EOS
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,  # noqa: E731
                       "rstrip": False, "single_word": False}
    plain = lambda s: {"content": s, "lstrip": False, "normalized": True, "rstrip": False,  # noqa: E731
                       "single_word": False}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": added(BOS), "do_lower_case": True, "eos_token": added(EOS),
        "errors": "replace", "model_max_length": TINY_MAX_LENGTH, "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer", "unk_token": added(EOS)}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": plain(BOS), "eos_token": plain(EOS), "pad_token": pad if pad == "!" else plain(EOS),
        "unk_token": plain(EOS)}, indent=2) + "\n")
    return out


# ------------------------------------------------------------------ configs
def tiny_configs(kind: str = "sd1") -> dict[str, dict]:
    """The diffusers/transformers configs of a tiny kind: unet, vae, text_encoder, scheduler."""
    _check_kind(kind)
    sd2 = _FAMILY[kind] == "sd2"
    vocab, _ = tiny_vocab_and_merges()
    hidden = 192 if sd2 else 128
    text = {
        "vocab_size": len(vocab), "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2, "num_attention_heads": hidden // 64, "max_position_embeddings": TINY_MAX_LENGTH,
        "hidden_act": "gelu" if sd2 else "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": hidden,
        "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab["!"] if sd2 else vocab[EOS],
    }
    unet = {
        "sample_size": TINY_LATENT, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [64, 128] if sd2 else [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": hidden,
        "attention_head_dim": [1, 2] if sd2 else 8,
        "use_linear_projection": sd2, "norm_num_groups": 32,
    }
    vae = {
        "sample_size": TINY_SIZE, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": dict(_SCHEDULERS[kind])}


# ------------------------------------------------------------------ components
class TinyComponents(NamedTuple):
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer_dir: Path
    scheduler_config: dict


_TOKENIZER_ROOT: Path | None = None


def _default_tokenizer_dir(kind: str) -> Path:
    global _TOKENIZER_ROOT
    if _TOKENIZER_ROOT is None:
        _TOKENIZER_ROOT = Path(tempfile.mkdtemp(prefix="cpuflow-tiny-tok-"))
    d = _TOKENIZER_ROOT / kind
    if not (d / "special_tokens_map.json").is_file():
        write_tiny_tokenizer(d, kind)
    return d


def _perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Make every parameter distinct (norm weights are all ones after init)."""
    params = [p for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0])]
    noise = torch.randn(sum(p.numel() for p in params), generator=gen) * 0.02
    with torch.no_grad():
        i = 0
        for p in params:
            p.add_(noise[i:i + p.numel()].view(p.shape).to(p.dtype))
            i += p.numel()


def tiny_sd_components(kind: str = "sd1", seed: int = 0, tokenizer_dir: str | os.PathLike | None = None
                       ) -> TinyComponents:
    """Fresh tiny (unet, vae, text_encoder, tokenizer_dir, scheduler_config), float32, eval mode.

    Same kind + seed -> bit-identical weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tiny_configs(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**cfg["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    gen = torch.Generator().manual_seed(10_000 + seed)
    for m in (unet, vae, text_encoder):
        _perturb(m, gen)
        m.eval()
    tok = write_tiny_tokenizer(tokenizer_dir, kind) if tokenizer_dir is not None else _default_tokenizer_dir(kind)
    return TinyComponents(unet, vae, text_encoder, Path(tok), cfg["scheduler"])


def _strip_text_model(sd: dict) -> dict:
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def component_state_dicts(c) -> dict[str, dict]:
    """{"unet", "vae", "text_encoder"} -> state dict (text encoder keys without ``text_model.``)."""
    te = c.text_encoder.state_dict()
    te = {k: v for k, v in _strip_text_model(te).items() if k != "embeddings.position_ids"}
    return {"unet": c.unet.state_dict(), "vae": c.vae.state_dict(), "text_encoder": te}


def assert_same_weights(a, b, what: str = "") -> None:
    """Exact equality of two modules' (or state dicts') tensors, key by key."""
    sa = a.state_dict() if hasattr(a, "state_dict") else dict(a)
    sb = b.state_dict() if hasattr(b, "state_dict") else dict(b)
    sa = {k: v for k, v in _strip_text_model(sa).items() if not k.endswith("position_ids")}
    sb = {k: v for k, v in _strip_text_model(sb).items() if not k.endswith("position_ids")}
    assert set(sa) == set(sb), (f"{what}: key sets differ: only in first {sorted(set(sa) - set(sb))[:5]}, "
                                f"only in second {sorted(set(sb) - set(sa))[:5]}")
    for k in sorted(sa):
        x, y = sa[k], sb[k]
        assert tuple(x.shape) == tuple(y.shape), f"{what}: {k} shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert x.dtype == y.dtype, f"{what}: {k} dtype {x.dtype} != {y.dtype}"
        assert torch.equal(x, y), f"{what}: {k} differs"


# ------------------------------------------------------------------ diffusers folder
def save_tiny_diffusers_folder(path: str | os.PathLike, kind: str = "sd1", seed: int = 0) -> Path:
    """A complete diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    Loads with ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)``.
    The saved weights are read back and compared with the modules (exact)."""
    from safetensors.torch import load_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    c = tiny_sd_components(kind, seed, tokenizer_dir=out / "tokenizer")
    c.unet.save_pretrained(out / "unet", safe_serialization=True)
    c.vae.save_pretrained(out / "vae", safe_serialization=True)
    c.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(c.scheduler_config, indent=2) + "\n")
    import diffusers

    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", c.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
    # Read back what was written: a silently dropped prefix would otherwise mean random init later.
    saved = {
        "unet": load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")),
        "vae": load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors")),
        "text_encoder": load_file(str(out / "text_encoder" / "model.safetensors")),
    }
    for name, sd in component_state_dicts(c).items():
        assert_same_weights(sd, saved[name], f"saved {name}")
    return out


# ------------------------------------------------------------------ original single file
def tiny_original_state_dict(kind: str = "sd1", seed: int = 0, components: TinyComponents | None = None) -> dict:
    """The tiny weights in the ORIGINAL Stable Diffusion single-file layout.

    Besides the three models it holds what real files hold and the loader must
    ignore: the noise schedule buffers, SD 1.x's ``position_ids``, SD 2.x's unused
    last OpenCLIP block, ``text_projection`` and ``logit_scale``."""
    from export import checkpoint_keys as ck

    c = components or tiny_sd_components(kind, seed)
    cfg = tiny_configs(kind)
    sds = component_state_dicts(c)
    out: dict = {}
    out.update(ck.unet_to_original(sds["unet"], cfg["unet"]))
    out.update(ck.vae_to_original(sds["vae"], cfg["vae"]))
    gen = torch.Generator().manual_seed(20_000 + seed)
    if _FAMILY[kind] == "sd1":
        out.update(ck.clip_to_original(sds["text_encoder"]))
        out[ck.CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(TINY_MAX_LENGTH)[None]
    else:
        out.update(ck.openclip_to_original(sds["text_encoder"]))
        # The penultimate-layer convention: one more (unused) block, as real SD 2.x files.
        n = cfg["text_encoder"]["num_hidden_layers"]
        p = f"{ck.OPENCLIP_PREFIX}transformer.resblocks."
        for k in [k for k in out if k.startswith(f"{p}0.")]:
            out[k.replace(f"{p}0.", f"{p}{n}.")] = torch.randn(out[k].shape, generator=gen)
        w = cfg["text_encoder"]["hidden_size"]
        out[ck.OPENCLIP_PREFIX + "text_projection"] = torch.randn(w, w, generator=gen)
        out[ck.OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    out["alphas_cumprod_prev"] = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)[:-1]]).float()
    return {k: v.contiguous() for k, v in out.items()}


_GLOBAL_STEPS = {"sd1": 840000, "sd2": 875000, "sd2-v": 110000}


def save_tiny_single_file(path: str | os.PathLike, kind: str = "sd1", fmt: str = "safetensors", seed: int = 0, *,
                          metadata: bool = True, global_step: int | None | str = "auto") -> Path:
    """Write the SAME weights as ``tiny_sd_components(kind, seed)`` as one original-layout file.

    ``fmt="safetensors"``: with ``metadata`` the file carries ModelSpec metadata
    (``modelspec.architecture``, ``modelspec.prediction_type``, ``modelspec.resolution``
    64x64), the way trainers mark SD files; without it the loader has to guess.
    ``fmt="ckpt"``: ``torch.save({"state_dict": ..., "global_step": ...})`` like
    the original checkpoints; ``global_step`` "auto" = SD's own values (sd2 875000 =
    SD 2.0-base -> epsilon; sd2-v 110000 = SD 2.1-v -> v_prediction), None = absent."""
    _check_kind(kind)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = tiny_original_state_dict(kind, seed)
    if fmt == "safetensors":
        from safetensors.torch import load_file, save_file

        meta = {"format": "pt"}
        if metadata:
            arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                    "sd2-v": "stable-diffusion-v2-768-v"}[kind]
            meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                         "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion",
                         "modelspec.title": f"tiny-{kind}", "modelspec.resolution": f"{TINY_SIZE}x{TINY_SIZE}",
                         "modelspec.prediction_type": "v" if _PREDICTION[kind] == "v_prediction" else "epsilon"})
        save_file(sd, str(out), metadata=meta)
        back = load_file(str(out))
    elif fmt == "ckpt":
        gs = _GLOBAL_STEPS[kind] if global_step == "auto" else global_step
        obj: dict = {"state_dict": sd}
        if gs is not None:
            obj["global_step"] = int(gs)
            obj["epoch"] = 6
        torch.save(obj, str(out))
        back = torch.load(str(out), weights_only=True, map_location="cpu")["state_dict"]
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
    assert_same_weights(sd, back, f"saved {out.name}")
    return out


def expected_prediction_type(kind: str) -> str:
    return _PREDICTION[_check_kind(kind)]


def expected_family(kind: str) -> str:
    return _FAMILY[_check_kind(kind)]
