"""DeepCache on the shipped model: rebuild its torch weights, export with --deep-cache, judge.

The shipped folder (cpuflow/models/default) holds only ONNX / OpenVINO files,
and `cpuflow export --deep-cache` needs the torch modules. This script

1. rebuilds the diffusers pipeline from the shipped ONNX files: the configs are
   export/train_default.py's, every torch parameter is read from the ONNX
   initializer of the same name (``unet.``, ``text_encoder.``, ``vae.``,
   ``encoder.`` / ``quant_conv.`` prefixes of the export wrappers) or, where the
   exporter folded it (``onnx::MatMul_*`` = a Linear weight transposed,
   ``onnx::Mul_*`` / ``onnx::Add_*`` = a GroupNorm weight / bias), from the
   initializer that the node of that module's scope consumes; every parameter
   must be found exactly once, and each rebuilt module must reproduce the
   shipped ONNX on random inputs (>= 100 dB) before anything else runs;
2. exports it with ``deep_cache=True`` (both formats, the usual parity gate);
3. runs the toy-world judge (bench/eval_default_model.py) for deep cache off
   (the plain unet) and N = 2, 3, 5, and times them.

    python bench/deepcache_default_model.py --work /tmp/dc-default --json bench/results/deepcache-default-model.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _initializers(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """name -> array, and for folded names the scope of the node consuming them."""
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
            raise SystemExit(f"{onnx_path}: {key} found twice")
        got[key] = np.ascontiguousarray(a)
    missing = sorted(k for k, v in want.items() if k not in got and v.dtype.is_floating_point
                     and not k.endswith("position_ids") and not k.startswith(skip))
    if missing:
        raise SystemExit(f"{onnx_path}: no initializer for {missing[:8]} ({len(missing)} in all)")
    module.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=False)


def check_against_onnx(wrapper, onnx_path: Path, feeds: dict[str, np.ndarray], what: str) -> float:
    import onnxruntime as ort
    import torch

    from export.validate import figures
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    with torch.no_grad():
        got = wrapper(*[torch.from_numpy(feeds[i.name]) for i in sess.get_inputs()]).numpy()
    db = figures(want, got)["psnr_db"]
    print(f"[rebuild] {what}: torch vs shipped ONNX {db:.1f} dB", file=sys.stderr)
    if db < 100:
        raise SystemExit(f"{what}: the rebuilt weights do not reproduce the shipped model ({db:.1f} dB)")
    return db


def rebuild(shipped: Path, out: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from export.components import TextEncoderWrapper, UNetWrapper, VaeDecoderWrapper, VaeEncoderWrapper
    from export.train_default import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

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
    load_from_onnx(text, f("text_encoder"), {"text_encoder.": te_prefix})
    load_from_onnx(vae, f("vae_decoder"), {"vae.": "", "decoder.": "decoder.", "post_quant_conv.": "post_quant_conv."},
                   skip=("encoder.", "quant_conv."))
    load_from_onnx(vae, f("vae_encoder"), {"encoder.": "encoder.", "quant_conv.": "quant_conv."},
                   skip=("decoder.", "post_quant_conv."))
    rng = np.random.default_rng(0)
    figs = {
        "unet": check_against_onnx(UNetWrapper(unet), f("unet"), {
            "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([900.0, 300.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, te_cfg["hidden_size"]), dtype=np.float32)}, "unet"),
        "text_encoder": check_against_onnx(TextEncoderWrapper(text), f("text_encoder"), {
            "input_ids": rng.integers(0, te_cfg["vocab_size"], (2, 77), dtype=np.int64)}, "text_encoder"),
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


@click.command()
@click.option("--work", type=click.Path(path_type=Path), required=True, help="scratch folder")
@click.option("--every", "everies", multiple=True, type=int, default=(2, 3, 5))
@click.option("--n", default=72, help="held-out prompts")
@click.option("--backend", default="openvino")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(work, everies, n, backend, json_out):
    from eval_default_model import evaluate_variant

    from cpuflow.pipelines.model import shipped_model_dir
    from export.build import export_model
    from export.sources import load_source

    work.mkdir(parents=True, exist_ok=True)
    src, model = work / "src", work / "model"
    rebuilt = rebuild(shipped_model_dir(), src)
    t0 = time.perf_counter()
    export_model(load_source(str(src)), model, formats=("onnx", "openvino"), deep_cache=True,
                 progress=lambda ev: print(ev.message, file=sys.stderr) if ev.kind == "end" else None)
    export_s = time.perf_counter() - t0
    rows = []
    for every in (None, *everies):
        r = evaluate_variant(model, "fp32", backend=backend, n=n, steps=20, guidance=5.0, sampler=None,
                             precision="f32", deep_cache=every)
        r["deep_cache"] = every
        rows.append(r)
        a = r["accuracy"]
        print(f"deep cache {every or 'off':<4} " + "  ".join(f"{k} {100 * a[k]:5.1f}%" for k in sorted(a))
              + f"  ({r['seconds']} s)", file=sys.stderr)
    if json_out:
        json_out.write_text(json.dumps({"rebuilt_vs_shipped_psnr_db": rebuilt, "export_seconds": round(export_s, 1),
                                        "backend": backend, "steps": 20, "guidance": 5.0, "n_prompts": n,
                                        "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
