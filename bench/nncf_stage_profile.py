"""Where NNCF's int8 stage spends its time on a UNet IR (issue #15 item 1).

Runs the export's own ``export.quantize.ov_quantize(..., "static", samples)`` on an fp32 UNet IR with
16 seeded calibration inputs at 256x256 (the export's default calibration size for SD 1.5; NNCF's time
hardly depends on the values) and times every ``ov.Core.compile_model`` NNCF makes: its statistics
model (the UNet plus the statistics' outputs) and the fast-bias-correction subgraphs.

    python bench/nncf_stage_profile.py MODEL_DIR/unet/openvino_model.xml OUT_DIR [--no-snippets] [--static]

``--no-snippets`` adds SNIPPETS_MODE=DISABLE to NNCF's compiles (does the CPU plugin's subgraph
tokenization make the statistics model's compile slow?); ``--static`` gives NNCF a copy of the IR
reshaped to the calibration inputs' static shapes (are dynamic shapes what makes it slow?). The
FakeQuantize count of the result is printed too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export import quantize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("unet_xml", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--no-snippets", action="store_true")
    ap.add_argument("--static", action="store_true")
    args = ap.parse_args()
    compiles: list[tuple[float, int]] = []
    compile_model = ov.Core.compile_model

    def timed(self, *a, **k):
        if args.no_snippets and k.get("config"):
            k["config"] = dict(k["config"], SNIPPETS_MODE="DISABLE")
        t = time.perf_counter()
        out = compile_model(self, *a, **k)
        ops = len(a[0].get_ops()) if hasattr(a[0], "get_ops") else -1
        compiles.append((time.perf_counter() - t, ops))
        return out

    ov.Core.compile_model = timed
    rng = np.random.default_rng(0)
    ehs = rng.standard_normal((2, 77, 768)).astype(np.float32)
    samples = [{"sample": rng.standard_normal((2, 4, 32, 32)).astype(np.float32),
                "timestep": np.full(2, 900.0 - 50 * i, np.float32), "encoder_hidden_states": ehs}
               for i in range(16)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    src = args.unet_xml
    if args.static:
        model = ov.Core().read_model(str(src))
        model.reshape({p: ov.PartialShape(list(samples[0][p.get_any_name()].shape)) for p in model.inputs})
        src = args.out_dir / "unet_fp32_static.xml"
        ov.save_model(model, str(src), compress_to_fp16=False)
        del model
    t = time.perf_counter()
    quantize.ov_quantize(src, args.out_dir / "unet_int8.xml", "static", samples)
    total = time.perf_counter() - t
    fq = sum(op.get_type_name() == "FakeQuantize"
             for op in ov.Core().read_model(str(args.out_dir / "unet_int8.xml")).get_ops())
    big = [c for c in compiles if c[1] > 1000]
    print(json.dumps({"total_s": round(total, 1), "compiles": len(compiles),
                      "statistics_model_compile_s": [round(c[0], 1) for c in big],
                      "statistics_model_ops": [c[1] for c in big],
                      "other_compiles_s": round(sum(c[0] for c in compiles if c[1] <= 1000), 1),
                      "fake_quantize_ops": fq, "no_snippets": args.no_snippets, "static": args.static}))


if __name__ == "__main__":
    main()
