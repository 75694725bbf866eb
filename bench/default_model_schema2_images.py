"""The shipped model before and after its re-export to manifest schema 2
(scripts/reexport_default_model.py): the same images?

For every variant and backend: two txt2img images (the model's defaults with 8
steps; guidance 7.5 with a negative prompt) and one img2img image, from the old
folder and the new one; prints whether they are equal and their PSNR, and the
text-encoder conditioning's PSNR. The old folder comes from git:

    mkdir -p /tmp/old && git archive 051eadc cpuflow/models/default | tar -x -C /tmp/old
    python bench/default_model_schema2_images.py /tmp/old/cpuflow/models/default \
        --json bench/results/default-model-schema2-images.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def _outputs(model: Path | None, backend: str, variant: str) -> dict[str, np.ndarray]:
    from PIL import Image

    from cpuflow import Pipeline
    from cpuflow.prompt_encoding import PromptOptions, encode_text, encoders_of
    init = Image.fromarray(np.random.default_rng(3).uniform(0, 255, (64, 64, 3)).astype(np.uint8))
    with Pipeline.load(model, backend=backend, variant=variant, threads=2, use_cache=False) as p:
        return {
            "text_encoder": encode_text(p.model, encoders_of(p.model), "a red circle on a blue background",
                                        PromptOptions()).embeddings,
            "txt2img": np.asarray(p.txt2img("a red circle on a blue background", seed=7, steps=8).images[0]),
            "txt2img_neg": np.asarray(p.txt2img("a red circle", negative_prompt="blue", seed=9, steps=4,
                                                guidance=7.5).images[0]),
            "img2img": np.asarray(p.img2img("a green square", init, strength=0.6, seed=8, steps=8).images[0]),
        }


@click.command()
@click.argument("old", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--new", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="default: the shipped model")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(old, new, json_out):
    rows = []
    for backend in ("onnxruntime", "openvino"):
        for variant in ("fp32", "int8-weights", "int8"):
            a, b = _outputs(old, backend, variant), _outputs(new, backend, variant)
            row = {"backend": backend, "variant": variant}
            for k in a:
                peak = 255.0 if k != "text_encoder" else float(np.abs(a[k]).max())
                equal = bool(np.array_equal(a[k], b[k]))
                row[k] = {"equal": equal, "psnr_db": None if equal else round(_psnr(a[k], b[k], peak), 1)}
            rows.append(row)
            print(f"{backend:12} {variant:13} " + "  ".join(
                f"{k} {'equal' if v['equal'] else str(v['psnr_db']) + ' dB'}" for k, v in row.items()
                if isinstance(v, dict)), file=sys.stderr)
    if json_out:
        from cpuflow.pipelines.model import shipped_model_dir
        schema = {name: json.loads((d / "cpuflow.json").read_text())["schema_version"]
                  for name, d in (("old", old), ("new", new or shipped_model_dir()))}
        json_out.write_text(json.dumps({"schema": schema, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
