"""UNet call time of the full-size SD 1.5 UNet's OpenVINO files, interleaved, on this CPU as it is
or with oneDNN capped below VNNI (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``, set by the caller): fp32, the
7-bit int8 file (``--quantize int8-7bit``), full-range int8 and int8-weights where the folder(s) have
them. 512x512, batch 2 (the guidance pair), f32 hint, CPU threads as OpenVINO picks them.

    python bench/int8_7bit_speed.py --ir fp32=OUT/unet/openvino_model.xml \\
        --ir int8-7bit=OUT/unet/openvino_model_int8-7bit.xml --rounds 3 --json result.json
"""
from __future__ import annotations

import json
import os
import platform
import time

import click
import numpy as np


@click.command()
@click.option("--ir", "irs", multiple=True, required=True, metavar="NAME=XML")
@click.option("--rounds", default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(irs, rounds, json_path):
    import openvino as ov

    from cpuflow.cpu import cpu_features
    core = ov.Core()
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    compiled, out = {}, {}
    for spec in irs:
        name, xml = spec.split("=", 1)
        t = time.perf_counter()
        compiled[name] = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        req = compiled[name].create_infer_request()
        req.infer(feed)                    # packs the weights: not counted
        out[name] = {"compile_and_first_call_s": round(time.perf_counter() - t, 2), "calls_s": []}
        compiled[name] = req
    ref = None
    for r in range(rounds):
        for name, req in compiled.items():
            t = time.perf_counter()
            res = req.infer(feed)
            out[name]["calls_s"].append(round(time.perf_counter() - t, 3))
            y = next(iter(res.values()))
            if ref is None:
                ref = y.copy()
            peak = float(ref.max() - ref.min())
            out[name]["psnr_db_vs_first"] = round(float(10 * np.log10(peak ** 2 / max(float(np.mean((y - ref) ** 2)), 1e-30))), 1)
        print(f"round {r + 1}: " + ", ".join(f"{n} {o['calls_s'][-1]:.2f} s" for n, o in out.items()), flush=True)
    for name, o in out.items():
        o["best_s"] = min(o["calls_s"])
        print(f"{name:12s} best {o['best_s']:.2f} s  calls {o['calls_s']}  PSNR vs {next(iter(out))}: "
              f"{o['psnr_db_vs_first']} dB")
    f = cpu_features(use_openvino=False)
    record = {"onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "cpu": platform.processor() or "",
              "isa": {k: v for k, v in f.items() if isinstance(v, bool)}, "openvino": ov.get_version(),
              "shape": "512x512, batch 2, f32 hint", "results": out}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main()
