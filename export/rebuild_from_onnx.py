"""Rebuild the shipped default model's torch modules from its own ONNX files.

The shipped folder (cpuflow/models/default) holds only ONNX / OpenVINO files;
work that needs the torch modules (a re-export to a newer manifest schema,
``export --deep-cache``) rebuilds them here. The configs are
export/train_default.py's; every torch parameter is read from the ONNX
initializer of the same name (``unet.``, ``text_encoder.``, ``vae.``,
``encoder.`` / ``quant_conv.`` prefixes of the export wrappers) or, where the
exporter folded it (``onnx::MatMul_*`` = a Linear weight transposed,
``onnx::Mul_*`` / ``onnx::Add_*`` = a GroupNorm weight / bias), from the
initializer that the node of that module's scope consumes. Every parameter
must be found exactly once, and each rebuilt module must reproduce the shipped
ONNX on random inputs (>= 100 dB) before anything else uses it.

Used by scripts/reexport_default_model.py and bench/deepcache_default_model.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cpuflow.errors import ModelError

MIN_REBUILD_DB = 100.0


def _initializers(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
    """name -> array, and for folded names the (op, node name) consuming them."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    scope = {}
    for node in m.graph.node:
        for i in node.input:
            if i.startswith("onnx::") and i in arrays:
                scope[i] = (node.op_type, node.name)
    return arrays, scope


def load_from_onnx(module, onnx_path: Path, prefixes: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """Fill ``module``'s parameters from the export of its wrapper. ``prefixes``:
    wrapper attribute (or node scope) prefix -> the module's own key prefix;
    ``skip``: key prefixes this file does not hold (the VAE's encoder in the decoder's)."""
    import torch

    arrays, scope = _initializers(onnx_path)
    want = module.state_dict()
    got: dict[str, np.ndarray] = {}

    def key_of(path: str) -> str | None:
        for p, own in prefixes.items():
            if path.startswith(p):
                return own + path[len(p):]
        return None

    for name, a in arrays.items():
        if name.startswith("onnx::"):
            if name not in scope:
                continue
            op, node = scope[name]
            parts = [p for p in node.split("/") if p][:-1]       # "/unet/down_blocks.0/.../to_q/MatMul"
            attr = {"MatMul": "weight", "Mul": "weight", "Add": "bias"}.get(op)
            if attr is None:
                continue
            key = key_of(".".join(parts) + "." + attr)
            if key is None or key not in want:
                continue
            t = want[key]
            if op == "MatMul":
                a = a.T
            a = a.reshape(tuple(t.shape))
        else:
            key = key_of(name)
            if key is None or key not in want:
                continue
        if key in got:
            raise ModelError(f"{onnx_path}: {key} found twice")
        got[key] = np.array(a, copy=True, order="C")   # writable: torch.from_numpy shares it
    missing = sorted(k for k, v in want.items() if k not in got and v.dtype.is_floating_point
                     and not k.endswith("position_ids") and not k.startswith(skip))
    if missing:
        raise ModelError(f"{onnx_path}: no initializer for {missing[:8]} ({len(missing)} in all)")
    module.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=False)


def check_against_onnx(forward, onnx_path: Path, feeds: dict[str, np.ndarray], what: str) -> float:
    """PSNR of ``forward(*inputs)`` (torch) against the ONNX file on ``feeds``; below
    MIN_REBUILD_DB the rebuild is wrong and nothing may use it."""
    import onnxruntime as ort
    import torch

    from .validate import figures
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    with torch.no_grad():
        got = forward(*[torch.from_numpy(feeds[i.name]) for i in sess.get_inputs()]).numpy()
    db = figures(want, got)["psnr_db"]
    print(f"[rebuild] {what}: torch vs shipped ONNX {db:.1f} dB", file=sys.stderr)
    if db < MIN_REBUILD_DB:
        raise ModelError(f"{what}: the rebuilt weights do not reproduce the shipped model ({db:.1f} dB)")
    return db


def _schema_1_text_encoder(m: dict) -> bool:
    """Schema 1: input_ids -> last_hidden_state (the token table inside the graph);
    schema 2: inputs_embeds -> ..., the table in token_embeddings.npy."""
    return [s["name"] for s in m["components"]["text_encoder"]["inputs"]] == ["input_ids"]


def load_text_encoder(text, shipped: Path, m: dict, te_prefix: str) -> None:
    import torch
    onnx_file = shipped / m["components"]["text_encoder"]["variants"]["fp32"]["files"]["onnx"][0]
    if _schema_1_text_encoder(m):
        load_from_onnx(text, onnx_file, {"text_encoder.": te_prefix})
        return
    token = f"{te_prefix}embeddings.token_embedding."
    load_from_onnx(text, onnx_file, {"text_encoder.": te_prefix}, skip=(token,))
    table = np.load(shipped / m["components"]["text_encoder"]["config"]["token_embeddings"]["path"],
                    allow_pickle=False)
    text.load_state_dict({token + "weight": torch.from_numpy(np.asarray(table, np.float32))}, strict=False)


def text_encoder_check(text, shipped: Path, m: dict, rng: np.random.Generator):
    """check_against_onnx's arguments for the text encoder of either schema."""
    from .components import TextEncoderWrapper
    onnx_file = shipped / m["components"]["text_encoder"]["variants"]["fp32"]["files"]["onnx"][0]
    cfg = m["components"]["text_encoder"]["config"]
    ids = rng.integers(0, cfg["vocab_size"], (2, 77), dtype=np.int64)
    if _schema_1_text_encoder(m):
        return (lambda i: text(input_ids=i).last_hidden_state), onnx_file, {"input_ids": ids}, "text_encoder"
    wrapper = TextEncoderWrapper(text, normed=True, pooled=False)
    embeds = wrapper.token_embedding.weight.detach().numpy()[ids]
    return (lambda e: wrapper(e)[0]), onnx_file, {"inputs_embeds": embeds}, "text_encoder"


def rebuild(shipped: Path, out: Path) -> dict[str, float]:
    """Write the shipped model as a diffusers folder in ``out``; returns the
    rebuilt-vs-shipped PSNR per component (each >= MIN_REBUILD_DB)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .components import UNetWrapper, VaeDecoderWrapper, VaeEncoderWrapper
    from .train_default import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

    m = json.loads((shipped / "cpuflow.json").read_text())
    tok = m["tokenizer"]
    te_cfg = m["components"]["text_encoder"]["config"]
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, vocab_size=te_cfg["vocab_size"],
                                        bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"],
                                        pad_token_id=tok["pad_token_id"])).eval()
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=m["latent"]["scaling_factor"]).eval()
    f = lambda c: shipped / m["components"][c]["variants"]["fp32"]["files"]["onnx"][0]  # noqa: E731
    load_from_onnx(unet, f("unet"), {"unet.": ""})
    te_prefix = next(iter(text.state_dict())).split("embeddings")[0]     # "" or "text_model."
    load_text_encoder(text, shipped, m, te_prefix)
    load_from_onnx(vae, f("vae_decoder"), {"vae.": "", "decoder.": "decoder.", "post_quant_conv.": "post_quant_conv."},
                   skip=("encoder.", "quant_conv."))
    load_from_onnx(vae, f("vae_encoder"), {"encoder.": "encoder.", "quant_conv.": "quant_conv."},
                   skip=("decoder.", "post_quant_conv."))
    rng = np.random.default_rng(0)
    width = te_cfg["hidden_size"]
    figs = {
        "unet": check_against_onnx(UNetWrapper(unet), f("unet"), {
            "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([900.0, 300.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, width), dtype=np.float32)}, "unet"),
        "text_encoder": check_against_onnx(*text_encoder_check(text, shipped, m, rng)),
        "vae_decoder": check_against_onnx(VaeDecoderWrapper(vae), f("vae_decoder"), {
            "latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)}, "vae_decoder"),
        "vae_encoder": check_against_onnx(VaeEncoderWrapper(vae), f("vae_encoder"), {
            "sample": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)}, "vae_encoder"),
    }
    sched = PNDMScheduler.from_config({k: v for k, v in m["scheduler"].items() if not k.startswith("_")})
    tokenizer = CLIPTokenizer.from_pretrained(str(shipped / tok["path"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        pipe.save_pretrained(str(out), safe_serialization=True)
    return figs
