"""Rebuild the model shipped in cpuflow/models/default from a trained diffusers folder.

    python export/train_default.py --out .cache/default-model          # ~40 min, see bench/default_model_training.md
    python scripts/build_default_model.py .cache/default-model [--quantize int8]

It exports both formats through the normal export stage (parity gate
included), then records the model's own generation defaults in the manifest:
this toy model is trained for guidance around 2 (see the training notes), so
`cpuflow generate` without --guidance uses that.
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
@click.option("--guidance", default=2.0, help="default guidance recorded in the manifest")
@click.option("--steps", default=20, help="default steps recorded in the manifest")
@click.option("--quantize", multiple=True, help="quantized variants to add (int8-weights, int8, hybrid)")
def main(source, out, guidance, steps, quantize):
    from export.build import ConsoleProgress, export_model
    from export.sources import load_source

    kwargs = {"quantize": tuple(quantize)} if quantize else {}
    export_model(load_source(str(source)), out, formats=("onnx", "openvino"), progress=ConsoleProgress(),
                 **kwargs)
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["name"] = "cpuflow-toyworld"
    # fp32 by default: at 64x64 int8 saves little time and costs accuracy
    # (bench/default_model_training.md); `--variant int8` picks it.
    data["defaults"] = {"guidance": guidance, "steps": steps, "variant": "fp32",
                        "note": "trained on coloured shapes; see bench/default_model_training.md"}
    write_manifest(out, data)   # validated and atomic; the files it records are unchanged
    print(f"default model written to {out}")


if __name__ == "__main__":
    main()
