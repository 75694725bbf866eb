"""PSNR of cpuflow's images against diffusers' StableDiffusionPipeline on the
same trained weights (the shipped model and the diffusers folder it was
exported from), float32 compute, default sampler, both backends.

    python bench/default_model_parity.py .cache/default-model [--model cpuflow/models/default]
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=None)
@click.option("--n", default=12)
@click.option("--guidance", default=None, type=float, help="default: the model's")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(source, model, n, guidance, json_out):
    import diffusers
    import torch

    from cpuflow import Pipeline
    from cpuflow.pipelines.model import shipped_model_dir
    from cpuflow.toyworld import held_out_prompts

    model = model or shipped_model_dir()
    ref = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    rows = []
    for backend in ("openvino", "onnxruntime"):
        with Pipeline.load(model, backend=backend, precision="f32") as pipe:
            g = guidance if guidance is not None else float(pipe.manifest.raw.get("defaults", {}).get("guidance", 7.5))
            for i, (prompt, _) in enumerate(held_out_prompts(n)):
                res = pipe.txt2img(prompt, seed=100 + i, guidance=g, steps=20)
                want = ref(prompt, num_inference_steps=20, guidance_scale=g, height=64, width=64,
                           generator=torch.Generator("cpu").manual_seed(100 + i)).images[0]
                a, b = np.asarray(res.images[0], np.float64), np.asarray(want, np.float64)
                mse = np.mean((a - b) ** 2)
                rows.append({"backend": backend, "prompt": prompt,
                             "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))})
    for backend in ("openvino", "onnxruntime"):
        ps = [r["psnr_db"] for r in rows if r["backend"] == backend]
        print(f"{backend:<12} min {min(ps):.1f} dB, median {float(np.median(ps)):.1f} dB over {len(ps)} prompts")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
