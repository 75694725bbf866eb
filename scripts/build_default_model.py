"""Rebuild the model shipped in cpuflow/models/default from a trained diffusers folder.

    python export/train_default.py --out .cache/default-model          # ~40 min, see bench/default_model_training.md
    python export/train_default.py --init-from .cache/default-model --out .cache/default-model-v4 \
        --unet-steps 1500 --unet-batch 16 --unet-lr 3e-4 --unet-warmup 100 \
        --guidance-distill 2.5 --distill-pair-guidance 5 --minutes 40  # ~20 min: guidance 5
    python scripts/build_default_model.py .cache/default-model-v4 --quantize int8 --quantize int8-weights

It exports both formats through the normal export stage (parity gate
included), then records the model's own generation defaults in the manifest:
guidance 5 and 20 steps (what the distilled model is trained for, see the
training notes), and precision f32 for `--precision auto` (bf16 saves a 64x64
model ~0.02 s per image, and guidance 5 amplifies its rounding into wrong shapes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpuflow.manifest import MANIFEST_NAME, write_manifest  # noqa: E402


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "cpuflow" / "models" / "default")
@click.option("--guidance", default=5.0, help="default guidance recorded in the manifest")
@click.option("--steps", default=20, help="default steps recorded in the manifest")
@click.option("--precision", default="f32", type=click.Choice(["auto", "f32", "bf16"]),
              help="what --precision auto means for this model (recorded in the manifest)")
@click.option("--quantize", multiple=True, help="quantized variants to add (int8-weights, int8, hybrid)")
def main(source, out, guidance, steps, precision, quantize):
    from export.build import ConsoleProgress, export_model
    from export.sources import load_source

    kwargs = {"quantize": tuple(quantize)} if quantize else {}
    export_model(load_source(str(source)), out, formats=("onnx", "openvino"), progress=ConsoleProgress(),
                 **kwargs)
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["name"] = "cpuflow-toyworld"
    # fp32 by default: at 64x64 int8 saves little time and costs accuracy
    # (bench/default_model_training.md); `--variant int8` picks it.
    data["defaults"] = {"guidance": guidance, "steps": steps, "variant": "fp32", "precision": precision,
                        "note": "trained on coloured shapes; see bench/default_model_training.md"}
    write_manifest(out, data)   # validated and atomic; the files it records are unchanged
    print(f"default model written to {out}")


if __name__ == "__main__":
    main()
