"""DeepCache on the shipped model: rebuild its torch weights, export with --deep-cache, judge.

The shipped folder (cpuflow/models/default) holds only ONNX / OpenVINO files,
and `cpuflow export --deep-cache` needs the torch modules. This script

1. rebuilds the diffusers pipeline from the shipped ONNX files
   (export/rebuild_from_onnx.py: every parameter found once, each module
   checked against the shipped ONNX to >= 100 dB before anything else runs);
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


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
    from export.rebuild_from_onnx import rebuild
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
