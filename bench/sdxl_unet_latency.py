"""SDXL base UNet latency on this machine, straight through OpenVINO (not `cpuflow bench`).

Written when a full-size SDXL export did not fit this 24 GB machine (the fp32 UNet alone is 10.3 GB,
and the TorchScript ONNX export holds a second copy), so this script measures only the
UNet: built with random weights from the vendored SDXL config, converted in memory with
openvino.convert_model (weights shared with torch, no ONNX), torch freed, then compiled
with OpenVINO's default precision (bf16 on this CPU) and timed at 1024x1024 batch 2 (CFG)
and 512x512 batch 1 (SDXL-Turbo style, no guidance). Random weights: timing only.
Since then `cpuflow export --format openvino` converts torch -> IR directly and the whole
model is measured by `cpuflow bench` (bench/README.md, "SDXL base architecture, full size").

    python bench/sdxl_unet_latency.py --json bench/results/sdxl-unet-latency.json
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time

import numpy as np


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    from cpuflow_export.detect import CONFIGS_DIR
    cfg = json.loads((CONFIGS_DIR / "sdxl" / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(cfg).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    build_s = time.perf_counter() - t0

    class Wrap(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.u(sample, timestep, encoder_hidden_states,
                          added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]

    ex = (torch.randn(1, 4, 64, 64), torch.tensor([999.0]), torch.randn(1, 77, 2048), torch.randn(1, 1280),
          torch.tensor([[512.0, 512, 0, 0, 512, 512]]))
    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(Wrap(unet), example_input=ex)
    convert_s = time.perf_counter() - t0
    del unet
    gc.collect()
    core = ov.Core()
    out = {"params": n_params, "build_s": round(build_s, 1), "convert_s": round(convert_s, 1),
           "peak_rss_gib_after_convert": round(rss_gib(), 2), "openvino": ov.get_version(), "runs": []}
    for label, b, hw in (("1024x1024 batch 2 (CFG)", 2, 128), ("512x512 batch 1 (turbo, no CFG)", 1, 64)):
        m = model.clone()
        m.reshape({m.inputs[0]: [b, 4, hw, hw], m.inputs[1]: [b], m.inputs[2]: [b, 77, 2048],
                   m.inputs[3]: [b, 1280], m.inputs[4]: [b, 6]})
        t0 = time.perf_counter()
        cm = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
        compile_s = time.perf_counter() - t0
        prec = str(cm.get_property("INFERENCE_PRECISION_HINT"))
        rng = np.random.default_rng(0)
        feeds = [rng.standard_normal((b, 4, hw, hw), dtype=np.float32), np.full((b,), 999.0, np.float32),
                 rng.standard_normal((b, 77, 2048), dtype=np.float32), rng.standard_normal((b, 1280), dtype=np.float32),
                 np.tile(np.array([[hw * 8, hw * 8, 0, 0, hw * 8, hw * 8]], np.float32), (b, 1))]
        req = cm.create_infer_request()
        t0 = time.perf_counter()
        req.infer(feeds)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            req.infer(feeds)
            times.append(time.perf_counter() - t0)
        run = {"setting": label, "precision": prec, "compile_s": round(compile_s, 1), "warmup_s": round(warm, 2),
               "times_s": [round(t, 2) for t in times], "median_s": round(float(np.median(times)), 2),
               "peak_rss_gib_so_far": round(rss_gib(), 2)}
        print(json.dumps(run), flush=True)
        out["runs"].append(run)
        del req, cm, m
        gc.collect()
    out["maxrss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
