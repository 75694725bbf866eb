"""The sensitivity pass behind the int8 recipe (issue #15, export/quantize.py's docstring).

Quantizes the shipped model's fp32 UNet with one candidate recipe (scopes kept float,
activation range estimator, SmoothQuant alpha, calibration prompts and guidance), then:

* PSNR of the UNet's output against fp32 on held-out in-domain UNet inputs (6 held-out
  toy-world prompts, 20 PNDM steps at guidance 5, every 3rd call): plain (min / mean over
  the calls) and CFG-combined at guidance 5 (``cfg_min`` / ``cfg_mean``): fast, a proxy;
* with ``--judge``: the judge (bench/eval_default_model.py's 72 prompts) on a scratch copy
  of the model whose int8 UNet is the candidate.

One JSON line per run is appended to ``--log``. Examples (the recipe chosen, then one
scope left out):

    python bench/int8_scope_study.py --backend openvino --name rule --judge \\
        --float conv_in --float conv_out --float conv_shortcut --float proj_io --float ff --float last_block
    python bench/int8_scope_study.py --backend openvino --name no-ff \\
        --float conv_in --float conv_out --float conv_shortcut --float proj_io --float last_block

Scratch files go to ``--work`` (default /tmp/int8-scope-study). About 20-40 s a run
(+40 s with --judge) on 2 cores.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpuflow import toyworld  # noqa: E402
from cpuflow.manifest import MANIFEST_NAME, file_record  # noqa: E402
from cpuflow.pipelines.model import shipped_model_dir  # noqa: E402

# scopes (regexes on the graphs' node names, diffusers module paths) the study can keep float
SCOPES = {
    "conv_in": r".*/conv_in/.*",
    "conv_out": r".*/conv_out/.*",
    "conv_shortcut": r".*/conv_shortcut/.*",
    "proj_io": r".*/proj_(in|out)/.*",
    "ff": r".*/ff/.*",
    "ff_net2": r".*/ff/net\.2/.*",
    "time": r".*(time_embedding|time_emb_proj).*",
    "attn_scores": r".*/attn[12]/MatMul(_1)?$",
    "xattn_kv": r".*/attn2/to_[kv]/.*",
    "first_block": r".*/down_blocks\.0/.*",
    "last_block": r".*/up_blocks\.2/.*",                 # the shipped UNet has 3 up blocks
    "resnet_conv": r".*/resnets\.\d+/conv[12]/.*",
    "updown": r".*/(up|down)samplers\.0/.*",
    "mid": r".*/mid_block/.*",
}
GUIDANCE = 5.0


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """Training wordings of ``n`` random toy-world pictures (never the held-out wordings)."""
    rng = random.Random(seed)
    attrs = toyworld.all_attrs()
    rng.shuffle(attrs)
    return [toyworld.sample_prompt(a, rng) for a in attrs[:n]]


def _cached(path: Path, make):
    if path.exists():
        return pickle.loads(path.read_bytes())
    value = make()
    path.write_bytes(pickle.dumps(value))
    return value


def calibration(work: Path, prompts: str, guidance: float):
    from export.calibrate import capture, read_prompts
    texts = toy_prompts(16) if prompts == "toy" else read_prompts()[:16]
    return _cached(work / f"cal-{prompts}-{guidance}.pkl",
                   lambda: capture(shipped_model_dir(), texts, steps=10, backend="openvino", guidance=guidance))


def held_out(work: Path) -> list[dict]:
    from export.calibrate import capture
    prompts = [p for p, _ in toyworld.held_out_prompts(72)][::12]
    return _cached(work / "held-out.pkl", lambda: capture(shipped_model_dir(), prompts, steps=20, backend="openvino",
                                                         guidance=GUIDANCE, seed=500, precision="f32").samples[::3])


def psnr_figures(fmt: str, path: Path, feeds: list[dict], work: Path) -> dict:
    from export import validate
    from export.quantize import run_many
    src = shipped_model_dir() / ("unet/openvino_model.xml" if fmt == "openvino" else "unet/model.onnx")
    refs = _cached(work / f"ref-{fmt}.pkl", lambda: [o["out_sample"] for o in run_many(fmt, src, feeds)])
    outs = [o["out_sample"] for o in run_many(fmt, path, feeds)]
    plain = [validate.figures(r, o)["psnr_db"] for r, o in zip(refs, outs)]
    guided = [validate.figures(r[0] + GUIDANCE * (r[1] - r[0]), o[0] + GUIDANCE * (o[1] - o[0]))["psnr_db"]
              for r, o in zip(refs, outs)]
    return {"min": round(min(plain), 2), "mean": round(float(np.mean(plain)), 2),
            "cfg_min": round(min(guided), 2), "cfg_mean": round(float(np.mean(guided)), 2)}


def make_openvino(dst: Path, samples, patterns, estimator: str, sq: float) -> int:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    model = ov.Core().read_model(str(shipped_model_dir() / "unet/openvino_model.xml"))
    out = nncf.quantize(
        model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
        ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX if estimator == "minmax" else None,
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=sq, convolution=-1)))
    ov.save_model(out, str(dst), compress_to_fp16=False)
    return sum(1 for op in out.get_ops() if op.get_type_name() == "FakeQuantize")


def make_onnx(dst: Path, samples, patterns, work: Path, ranges: Path) -> int:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from export import ort_calibration
    from export import quantize as q
    src = shipped_model_dir() / "unet/model.onnx"
    graph = onnx.load(str(src), load_external_data=False)
    weightless = q.onnx_weightless_matmuls(graph)
    rx = [re.compile(p) for p in patterns]
    exclude = weightless + [n.name for n in graph.graph.node if n.op_type in q.ORT_STATIC_OPS
                            and any(r.fullmatch(n.name) for r in rx)]
    if not ranges.exists():
        ort_calibration.save_cache(ort_calibration.calibrate_ranges(src, samples, op_types=q.ORT_STATIC_OPS,
                                                                    exclude=weightless), ranges)
    tmp = work / "ort-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with q._tempdir_in(tmp):
        quantize_static(str(src), str(tmp / "q.onnx"), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(q.ORT_STATIC_OPS), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=str(ranges))
    q.rewrite_onnx(tmp / "q.onnx", dst)
    shutil.rmtree(tmp)
    return sum(1 for n in onnx.load(str(dst), load_external_data=False).graph.node if n.op_type == "QuantizeLinear")


def judge(work: Path, fmt: str, files: list[Path]) -> dict:
    """The judge on a scratch copy of the shipped model whose int8 UNet is ``files``."""
    from eval_default_model import evaluate_variant
    model = work / "model"
    if not model.exists():
        shutil.copytree(shipped_model_dir(), model)
    m = json.loads((model / MANIFEST_NAME).read_text())
    for src, rel in zip(files, m["components"]["unet"]["variants"]["int8"]["files"][fmt]):
        shutil.copyfile(src, model / rel)
        m["files"][rel] = file_record(model, rel)
    (model / MANIFEST_NAME).write_text(json.dumps(m, indent=2))
    backend = "openvino" if fmt == "openvino" else "onnxruntime"
    r = evaluate_variant(model, "int8", backend=backend, n=72, steps=20, guidance=GUIDANCE, sampler=None,
                         precision="f32" if backend == "openvino" else "auto")
    return {k: round(100 * v, 1) for k, v in r["accuracy"].items()}


@click.command()
@click.option("--backend", type=click.Choice(["openvino", "onnxruntime"]), required=True)
@click.option("--name", required=True)
@click.option("--float", "floats", multiple=True, type=click.Choice(sorted(SCOPES)), help="scope kept float")
@click.option("--estimator", type=click.Choice(["minmax", "mean"]), default="minmax",
              help="OpenVINO activation ranges: min / max over all samples, or NNCF's default (mean)")
@click.option("--smooth-quant", "sq", type=float, default=-1.0, help="OpenVINO SmoothQuant MatMul alpha (-1: off)")
@click.option("--prompts", type=click.Choice(["sd", "toy"]), default="sd",
              help="calibration prompts: the export's shipped list, or toy-world training wordings")
@click.option("--guidance", type=float, default=GUIDANCE, help="calibration guidance")
@click.option("--judge", "do_judge", is_flag=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/int8-scope-study"))
@click.option("--log", type=click.Path(path_type=Path), default=ROOT / "bench/results/int8-scope-study.jsonl")
def main(backend, name, floats, estimator, sq, prompts, guidance, do_judge, work, log):
    work.mkdir(parents=True, exist_ok=True)
    cal = calibration(work, prompts, guidance)
    patterns = [SCOPES[f] for f in floats]
    fmt = "openvino" if backend == "openvino" else "onnx"
    out = work / backend / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if fmt == "openvino":
        dst = out / "openvino_model_int8.xml"
        count = make_openvino(dst, cal.samples, patterns, estimator, sq)
        files = [dst, dst.with_suffix(".bin")]
    else:
        dst = out / "model_int8.onnx"
        count = make_onnx(dst, cal.samples, patterns, work, work / f"ort-ranges-{prompts}-{guidance}.json")
        files = [dst, dst.with_name(dst.name + "_data")]
    rec = {"backend": backend, "name": name, "float": list(floats), "calibration": [prompts, guidance],
           "quantizers": count, "seconds": round(time.perf_counter() - t0, 1),
           "psnr_db": psnr_figures(fmt, dst, held_out(work), work)}
    if fmt == "openvino":
        rec.update(estimator=estimator, smooth_quant=sq)
    if do_judge:
        rec["judge"] = judge(work, fmt, files)
    with open(log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
