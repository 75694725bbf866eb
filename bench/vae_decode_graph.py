"""Why one OpenVINO VAE decoder can be slower than another on the same weights (issue #15).

The issue measured cpuflow's fp32 VAE decode at 19.5 s against optimum-intel's 15.9 s
on the same OpenVINO. optimum-intel converts the torch module straight to OpenVINO
(``ov.convert_model(module)``); cpuflow's default export (``--format both``) makes the
IR from its ONNX file, ``--format openvino`` goes straight from torch. This script
builds the full-size SD 1.5 VAE (random weights, seed 0: latency does not depend on
the values), converts its decoder both ways with cpuflow's own export functions,
prints each graph's op-type histogram where they differ, and times one 512x512
decode of each (compiled with 2 threads, precision hints f32 and the CPU's default)
in interleaved rounds, best of each.

    python bench/vae_decode_graph.py --rounds 3 --json bench/results/vae-decode-graph.json
"""
from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def op_histogram(model) -> collections.Counter:
    return collections.Counter(op.get_type_name() for op in model.get_ordered_ops())


@click.command()
@click.option("--size", default=512, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=None, help="scratch folder (default: a temporary one)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(size, rounds, threads, work, json_out):
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL

    from cpuflow import cpu
    from export.components import torch_inputs, vae_decoder_spec, wrap_for_export
    from export.to_onnx import MODEL_FILE, export_onnx
    from export.to_openvino import convert_onnx_to_openvino
    from export.torch_to_openvino import convert_torch_to_openvino

    tmp = tempfile.TemporaryDirectory() if work is None else None
    work = Path(tmp.name) if tmp else work
    cfg = json.loads((ROOT / "export" / "configs" / "sd15" / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(cfg).eval()

    class Loaded:   # what wrap_for_export reads: the spec's source attribute
        pass
    loaded = Loaded()
    loaded.vae = vae
    spec = vae_decoder_spec(vae)
    lat = size // 8
    feeds = spec.sample_inputs({"batch": 1, "latent_height": lat, "latent_width": lat})
    module = wrap_for_export(loaded, spec)
    example = torch_inputs(feeds, spec)
    with torch.no_grad():
        ref = module(*example).numpy()

    t0 = time.perf_counter()
    export_onnx(module, spec, example, work / "onnx")
    xml_onnx = convert_onnx_to_openvino(work / "onnx" / MODEL_FILE, work / "ir-from-onnx")[0]
    t1 = time.perf_counter()
    xml_torch = convert_torch_to_openvino(module, spec, example, work / "ir-from-torch")[0]
    t2 = time.perf_counter()
    del module, vae
    print(f"conversions: via ONNX {t1 - t0:.1f} s, straight from torch {t2 - t1:.1f} s", file=sys.stderr)

    core = ov.Core()
    graphs = {"via ONNX (--format both)": xml_onnx, "from torch (--format openvino, optimum-intel's way)": xml_torch}
    hist = {k: op_histogram(core.read_model(str(x))) for k, x in graphs.items()}
    a, b = hist.values()
    differ = {op: [a.get(op, 0), b.get(op, 0)] for op in sorted(set(a) | set(b)) if a.get(op, 0) != b.get(op, 0)}
    print("op types that differ (via ONNX, from torch):", json.dumps(differ), file=sys.stderr)

    hints = ["f32"] + (["bf16"] if cpu.cpu_features().get("bf16") else [])
    compiled = {}
    for name, xml in graphs.items():
        for hint in hints:
            m = core.read_model(str(xml))
            m.reshape({m.inputs[0]: [1, 4, lat, lat]})
            compiled[(name, hint)] = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                   "INFERENCE_PRECISION_HINT": hint,
                                                                   "PERFORMANCE_HINT": "LATENCY"})
    x = feeds[spec.input_names()[0]]
    times = {k: [] for k in compiled}
    psnr = {}
    for k, c in compiled.items():          # warm-up
        out = c({0: x})[0]
        mse = float(np.mean((out.astype(np.float64) - ref) ** 2))
        psnr[k] = round(10 * np.log10(4.0 / mse), 1) if mse else float("inf")   # range [-1, 1]
    for r in range(rounds):
        for k, c in compiled.items():
            t = time.perf_counter()
            c({0: x})
            times[k].append(time.perf_counter() - t)
            print(f"round {r + 1} {k[0]} {k[1]}: {times[k][-1]:.2f} s", file=sys.stderr, flush=True)
    rows = [{"graph": k[0], "hint": k[1], "best_s": round(min(v), 3), "all_s": [round(t, 3) for t in v],
             "psnr_db_vs_torch": psnr[k]} for k, v in times.items()]
    print(f"SD 1.5 VAE decoder, {size}x{size}, {threads} threads, openvino {ov.__version__}; CPU: {cpu.describe()}")
    print("| graph | hint | best s | PSNR vs torch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['graph']} | {r['hint']} | {r['best_s']:.2f} | {r['psnr_db_vs_torch']} dB |")
    if json_out:
        json_out.write_text(json.dumps({"size": size, "threads": threads, "openvino": ov.__version__,
                                        "cpu": cpu.describe(), "op_types_differ": differ,
                                        "ops_via_onnx": dict(a), "ops_from_torch": dict(b), "rows": rows},
                                       indent=2) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
