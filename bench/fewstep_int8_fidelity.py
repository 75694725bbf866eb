"""How far a few-step model's int8 image is from its fp32 image (issue #15 item 5).

Loads the folder's int8 variant and its fp32 variant (one after the other, so one
UNet is in memory at a time), makes the same seeds at the model's defaults (SD-Turbo:
1 step, no guidance) with the full VAE decoder, and reports each seed's PSNR of the
int8 image against the fp32 image, plus the manifest's recorded held-out figure and
the calibration it came from.

    python bench/fewstep_int8_fidelity.py /work/bigexport/sd21turbo-int8own --seeds 4 \\
        --json bench/results/fewstep-int8-fidelity.json

Random-weight models make noise images: the PSNR bounds the numerical deviation
int8 brings on this architecture, not picture quality.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ("a lighthouse on a cliff at dawn, photograph", "a bowl of ramen, studio light",
           "a fox in the snow, watercolor", "a city street at night in the rain")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--seeds", default=4, show_default=True, help="images per variant (one prompt each, cycling)")
@click.option("--size", default=512, show_default=True)
@click.option("--backend", default="openvino", show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(model, seeds, size, backend, precision, threads, json_out):
    from cpuflow import cpu
    from cpuflow.api import Pipeline

    images: dict[str, list[np.ndarray]] = {}
    for variant in ("int8", "fp32"):
        with Pipeline.load(str(model), backend=backend, variant=variant, precision=precision,
                           threads=threads) as pipe:
            images[variant] = [np.asarray(pipe.txt2img(PROMPTS[s % len(PROMPTS)], seed=s, width=size,
                                                       height=size, watermark=False).images[0])
                               for s in range(seeds)]
    figs = [psnr(a, b) for a, b in zip(images["int8"], images["fp32"])]
    raw = json.loads((model / "cpuflow.json").read_text())
    fmt = "openvino" if backend == "openvino" else "onnx"
    held = raw["components"]["unet"]["variants"]["int8"]["parity"][fmt].get("held_out", {})
    cal = raw["export"]["quantize"]["calibration"]
    out = {"model": str(model), "size": size, "backend": backend, "precision": precision,
           "defaults": raw.get("defaults"), "cpu": cpu.describe(),
           "image_psnr_db": figs, "held_out": held,
           "calibration": {k: cal.get(k) for k in ("prompts", "steps", "samples", "guidance", "width",
                                                    "height", "held_out_calls")}}
    print(f"{model.name}: calibration {cal.get('prompts')} prompts x {cal.get('steps')} steps, "
          f"{cal.get('samples')} samples; held-out {held.get('psnr_db', float('nan')):.1f} dB "
          f"over {held.get('points')} call(s)")
    print("int8 image vs fp32 image, PSNR dB per seed: " + ", ".join(f"{f:.1f}" for f in figs)
          + f" (mean {np.mean(figs):.1f})")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
