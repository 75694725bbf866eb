"""The parity gate: every exported file, run by the backend the runtime uses, must
reproduce the float32 torch module on seeded inputs, or the export fails.

Figures per component and format:
  max_abs   max |out - ref|
  mean_abs  mean |out - ref|
  rel_max   max_abs / max |ref|           (scale-free: hidden states ~ 1..30, images ~ 1)
  psnr_db   20 log10(range(ref) / rmse)   (over the reference's own range)

Tolerances (both must hold):

* fp32 weights: rel_max <= 1e-3 and psnr_db >= 60. A correct float32 export
  differs from torch only by operation order, fused kernels and (OpenVINO)
  different convolution / softmax algorithms: measured here ~1e-6 relative on
  tiny models and reported ~1e-5..1e-4 for the full SD 1.5 UNet and VAE, so 1e-3
  leaves a 10x margin on full-size models. A wrong export is off by far more:
  a dropped layer, a baked-in shape, bf16 compute (~4e-3 relative per op,
  compounding) or a +0.1 bias on the UNet (0.1 / ~4 = 2.5e-2) all fail.
* fp16 weights: rel_max <= 2e-2 and psnr_db >= 40. Rounding every weight to
  fp16 adds a relative error of up to 2**-11 ~ 4.9e-4 per weight that partly
  cancels over a layer and grows mildly with depth; measured ~1e-3 relative on
  tiny models. The looser bound still catches structural mistakes (wrong output,
  dropped block, swapped inputs give rel_max ~ 1).

OpenVINO runs with INFERENCE_PRECISION_HINT f32: on AMX / AVX512-BF16 CPUs it
would otherwise silently compute in bf16 and the gate would measure bf16, not
the export.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from cpuflow.errors import ValidationFailed

PSNR_CAP_DB = 200.0  # identical outputs: report a finite number (JSON has no inf)


@dataclass(frozen=True)
class Tolerance:
    rel_max: float
    psnr_db: float

    def to_json(self) -> dict:
        return {"rel_max": self.rel_max, "psnr_db": self.psnr_db}


TOLERANCES = {
    "fp32": Tolerance(rel_max=1e-3, psnr_db=60.0),
    "fp16": Tolerance(rel_max=2e-2, psnr_db=40.0),
}


def figures(ref: np.ndarray, out: np.ndarray) -> dict:
    """Error figures of ``out`` against ``ref`` (both float arrays of one shape)."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        return {"max_abs": math.inf, "mean_abs": math.inf, "rel_max": math.inf, "psnr_db": -math.inf,
                "finite": False, "shape_mismatch": [list(ref.shape), list(out.shape)]}
    finite = bool(np.isfinite(out).all())
    diff = np.abs(out - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    rmse = float(np.sqrt(np.mean(np.square(out - ref)))) if diff.size else 0.0
    rng = float(ref.max() - ref.min()) if ref.size else 0.0
    if rmse == 0:
        psnr = PSNR_CAP_DB
    elif rng == 0 or not math.isfinite(rmse):
        psnr = -math.inf
    else:
        psnr = min(PSNR_CAP_DB, 20.0 * math.log10(rng / rmse))
    return {"max_abs": max_abs, "mean_abs": mean_abs, "rel_max": rel, "psnr_db": psnr, "finite": finite}


def parity(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray], weights: str) -> dict:
    """Compare every output; the entry is what the manifest records."""
    tol = TOLERANCES[weights]
    per_output = {}
    passed = True
    for name, r in ref.items():
        if name not in out:
            f = {"max_abs": math.inf, "mean_abs": math.inf, "rel_max": math.inf, "psnr_db": -math.inf,
                 "finite": False, "missing": True}
        else:
            f = figures(r, out[name])
        ok = f["finite"] and f["rel_max"] <= tol.rel_max and f["psnr_db"] >= tol.psnr_db
        per_output[name] = f
        passed = passed and ok
    # One output per component today: lift its figures to the top level.
    worst = max(per_output.values(), key=lambda f: (f["rel_max"], -f["psnr_db"]))
    entry = {k: _json_num(v) for k, v in worst.items() if k in ("max_abs", "mean_abs", "rel_max", "psnr_db")}
    entry["tolerance"] = tol.to_json()
    entry["passed"] = bool(passed)
    if len(per_output) > 1:
        entry["outputs"] = {n: {k: _json_num(v) for k, v in f.items()} for n, f in per_output.items()}
    return entry


def _json_num(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def format_figures(component: str, fmt: str, entry: Mapping) -> str:
    tol = entry["tolerance"]
    verdict = "ok" if entry["passed"] else "FAILED"
    return (f"[{component}] {fmt} parity vs torch: max_abs {entry['max_abs']:.3g}, "
            f"mean_abs {entry['mean_abs']:.3g}, rel_max {entry['rel_max']:.3g} (<= {tol['rel_max']:g}), "
            f"PSNR {entry['psnr_db']:.1f} dB (>= {tol['psnr_db']:g}) {verdict}")


def gate(component: str, fmt: str, entry: Mapping, *, force: bool) -> None:
    """Raise ValidationFailed for a failed entry unless ``force``."""
    if entry["passed"] or force:
        return
    raise ValidationFailed(
        format_figures(component, fmt, entry),
        hint="the exported model does not reproduce torch; report a bug, "
             "or pass --force to keep it marked validated: false",
    )


# --- running the exported files --------------------------------------------------
def run_onnx(model_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    try:
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, dict(feeds))
        return dict(zip(names, outs))
    finally:
        del sess
        gc.collect()


def run_openvino(xml_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml_path))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    try:
        req = compiled.create_infer_request()
        res = req.infer(dict(feeds))
        out = {}
        for port, value in res.items():
            for name in port.get_names():
                out[name] = np.array(value, copy=True)
        return out
    finally:
        del compiled, model
        gc.collect()


RUNNERS = {"onnx": run_onnx, "openvino": run_openvino}
