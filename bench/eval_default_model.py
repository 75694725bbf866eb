"""Attribute accuracy of an exported toy-world model, generated through cpuflow.

For each held-out prompt (wordings and seeds the model never saw together in
training), generate one image with cpuflow and check it by program
(cpuflow.toyworld.evaluate): shape colour, background colour, shape class.

    python bench/eval_default_model.py                       # the shipped model, every variant
    python bench/eval_default_model.py --model DIR --variant fp32 --variant int8 --json out.json

Defaults follow the issue's targets: the model's default sampler, 20 steps,
guidance 5, 64x64, f32 precision hint so fp32 means fp32.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from cpuflow import Pipeline
from cpuflow.manifest import load_manifest
from cpuflow.pipelines.model import shipped_model_dir
from cpuflow.toyworld import accuracy, evaluate, held_out_prompts


def evaluate_variant(model_dir: Path, variant: str, *, backend: str, n: int, steps: int, guidance: float,
                     sampler: str | None, precision: str, seed: int = 1000, deep_cache: int | None = None) -> dict:
    results = []
    t0 = time.perf_counter()
    with Pipeline.load(model_dir, backend=backend, variant=variant, precision=precision, threads=None) as pipe:
        for i, (prompt, attrs) in enumerate(held_out_prompts(n)):
            res = pipe.txt2img(prompt, steps=steps, guidance=guidance, sampler=sampler, seed=seed + i,
                               deep_cache=deep_cache)
            results.append(evaluate(res.images[0], attrs))
        ran = res.records[0]
    acc = accuracy(results)
    return {"variant": variant, "backend": backend, "precision": ran["precision"], "ran_variants": ran["variant"],
            "n_prompts": len(results), "accuracy": acc, "seconds": round(time.perf_counter() - t0, 1)}


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None)
@click.option("--variant", "variants", multiple=True, help="default: every variant in the manifest")
@click.option("--backend", "backends", multiple=True, default=("openvino",))
@click.option("--n", default=72, help="held-out prompts")
@click.option("--steps", default=20)
@click.option("--guidance", default=5.0)
@click.option("--sampler", default=None)
@click.option("--precision", default="f32")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(model, variants, backends, n, steps, guidance, sampler, precision, json_out):
    model = model or shipped_model_dir()
    m = load_manifest(model)
    if not variants:
        variants = sorted({v for c in m.components.values() for v in c.variants}, key=lambda v: v != "fp32")
    rows = []
    for backend in backends:
        for v in variants:
            if backend == "onnxruntime" and precision == "bf16":
                continue
            r = evaluate_variant(model, v, backend=backend, n=n, steps=steps, guidance=guidance, sampler=sampler,
                                 precision=precision if backend == "openvino" else "auto")
            rows.append(r)
            a = r["accuracy"]
            print(f"{backend:<12} {v:<13} " + "  ".join(f"{k} {100 * a[k]:5.1f}%" for k in sorted(a))
                  + f"  ({r['n_prompts']} prompts, {r['seconds']} s)", file=sys.stderr)
    if json_out:
        json_out.write_text(json.dumps({"model": str(model), "model_hash": m.model_hash, "steps": steps,
                                        "guidance": guidance, "sampler": sampler or "model default",
                                        "results": rows}, indent=2))


if __name__ == "__main__":
    main()
