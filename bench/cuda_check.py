"""The CUDA execution-provider check (issue #15 item 5): cpuflow's ONNX Runtime
backend with ``--device cuda`` against the same folder on the CPU provider, in
one run on one machine.

For each model folder it makes the same seeded txt2img image on the CUDA and
the CPU provider (and, with ``--img2img``, an img2img image from it), reports
the PSNR of the CUDA image against the CPU's (the target: >= 40 dB), the
providers the sessions really ran on (ORT falls back to the CPU silently; the
record's ``device`` says which), and the per-stage times of the record
(1 uncounted warm-up, then ``--repeat`` counted images; the best is reported,
all are kept).

    python bench/cuda_check.py --out results/ --model default --img2img \
        --model /tmp/sd15=sd15-random-512 --steps 20

``--model default`` is the model shipped with cpuflow (64x64, trained: its
images mean something); a ``--random-weights`` export proves plumbing, parity
and latency, not beauty. bench/cuda_check.sh runs this on the lent GPU machine
(bench/README.md, "CUDA execution provider").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "a red circle on a blue background"


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images, dB (inf when equal)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(d * d))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def machine() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import onnxruntime as ort
        info["onnxruntime"] = ort.__version__
        info["providers"] = ort.get_available_providers()
    except ImportError as e:
        info["onnxruntime"] = f"missing: {e}"
    try:
        q = "name,driver_version,memory.total"
        info["gpu"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run(model, device: str, variant: str | None, *, steps: int, size: int | None, repeat: int,
        seed: int, guidance: float | None = None, init_image=None) -> dict:
    """Load ``model`` on ``device`` and make the same image 1 + ``repeat`` times."""
    from cpuflow import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(model, backend="onnxruntime", device=device, variant=variant, use_cache=False)
    load_s = time.perf_counter() - t0
    params = dict(steps=steps, seed=seed, watermark=False)
    if guidance is not None:
        params["guidance"] = guidance
    if size:
        params.update(width=size, height=size)
    runs, result = [], None
    for i in range(1 + repeat):
        t = time.perf_counter()
        if init_image is None:
            result = pipe.txt2img(PROMPT, **params)
        else:
            result = pipe.img2img(PROMPT, init_image, strength=0.6, **params)
        wall = time.perf_counter() - t
        if i:   # the first is the warm-up (CUDA: cuDNN's algorithm search, memory pools)
            runs.append(dict(result.records[0]["timings"], wall=round(wall, 4)))
    record = result.records[0]
    pipe.close()
    best = min(runs, key=lambda r: r["wall"]) if runs else None
    return {"device_asked": device, "variant_asked": variant, "device_used": record.get("device"),
            "variant_used": record.get("variant"), "load_s": round(load_s, 3), "best": best, "runs": runs,
            "size": [record.get("width"), record.get("height")], "steps": steps,
            "image": np.asarray(result.images[0].convert("RGB"))}


def check_model(model, label: str, out: Path, *, gpu: str, steps: int, size: int | None, repeat: int, cpu_repeat: int,
                variants: list, img2img: bool, seed: int, guidance: float | None, tf32_off: bool = False) -> list:
    from PIL import Image

    rows = []
    for variant in variants:
        vname = variant or "default"
        cuda = run(model, gpu, variant, steps=steps, size=size, repeat=repeat, seed=seed, guidance=guidance)
        # the CPU runs the variant the GPU ran (on CUDA the default is fp32: cpuflow/variants.py)
        same = variant or (cuda["variant_used"] or {}).get("unet")
        cpu = run(model, "cpu", same, steps=steps, size=size, repeat=cpu_repeat, seed=seed, guidance=guidance)
        row = {"model": label, "task": "txt2img", "variant": vname, "psnr_cuda_vs_cpu_db": psnr_db(cuda["image"],
                                                                                                    cpu["image"])}
        for name, r in (("cuda", cuda), ("cpu", cpu)):
            Image.fromarray(r["image"]).save(out / f"{label}-{vname}-{name}.png")
            row[name] = {k: v for k, v in r.items() if k != "image"}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("model", "task", "variant", "psnr_cuda_vs_cpu_db")}),
              "cuda best", row["cuda"]["best"], "used", row["cuda"]["device_used"],
              "| cpu best", row["cpu"]["best"], flush=True)
        if tf32_off and gpu == "cuda":
            with without_tf32():
                c3 = run(model, gpu, variant, steps=steps, size=size, repeat=repeat, seed=seed, guidance=guidance)
            row3 = {"model": label, "task": "txt2img", "variant": vname + " (CUDA provider use_tf32=0)",
                    "psnr_cuda_vs_cpu_db": psnr_db(c3["image"], cpu["image"]),
                    "cuda": {k: v for k, v in c3.items() if k != "image"}, "cpu": row["cpu"]}
            rows.append(row3)
            print(json.dumps({k: row3[k] for k in ("model", "task", "variant", "psnr_cuda_vs_cpu_db")}),
                  "cuda best", row3["cuda"]["best"], flush=True)
        if img2img:
            init = Image.fromarray(cpu["image"])
            c2 = run(model, gpu, variant, steps=steps, size=size, repeat=repeat, seed=seed + 1, init_image=init)
            p2 = run(model, "cpu", same, steps=steps, size=size, repeat=cpu_repeat, seed=seed + 1,
                     init_image=init)
            row2 = {"model": label, "task": "img2img", "variant": vname,
                    "psnr_cuda_vs_cpu_db": psnr_db(c2["image"], p2["image"]),
                    "cuda": {k: v for k, v in c2.items() if k != "image"},
                    "cpu": {k: v for k, v in p2.items() if k != "image"}}
            rows.append(row2)
            print(json.dumps({k: row2[k] for k in ("model", "task", "variant", "psnr_cuda_vs_cpu_db")}),
                  "cuda best", row2["cuda"]["best"], "| cpu best", row2["cpu"]["best"], flush=True)
    return rows


def without_tf32():
    """A context in which cpuflow's ORT sessions ask the CUDA provider for no TF32 (plain fp32
    matmuls / convolutions), to tell TF32's share of the CUDA-vs-CPU difference."""
    import contextlib

    from cpuflow.backends import onnxruntime_backend as ob

    @contextlib.contextmanager
    def ctx():
        orig = ob.select_providers

        def patched(device, available):
            return [("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
                    for p in orig(device, available)]
        ob.select_providers = patched
        try:
            yield
        finally:
            ob.select_providers = orig
    return ctx()


def torch_cuda_reference(model: str, *, device: str, steps: int, size: int | None, repeat: int, seed: int, guidance: float,
                         cpuflow_image: np.ndarray | None) -> dict:
    """diffusers (PyTorch fp32) on CUDA on the same random weights, for a time beside cpuflow's
    (TF32 off, as PyTorch's matmul default; cuDNN's default convolutions)."""
    import torch

    from cpuflow.bench.runner import reference_source_for
    from cpuflow.manifest import load_manifest
    try:
        from cpuflow_export.bench_reference import build_pipeline
    except ImportError:
        from export.bench_reference import build_pipeline
    m = load_manifest(model)
    pipe, _ = build_pipeline(reference_source_for(m, None, None))
    pipe = pipe.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    if size:
        kw.update(width=size, height=size)
    times, img = [], None
    for i in range(1 + repeat):
        sync()
        t = time.perf_counter()
        out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **kw)
        sync()
        if i:
            times.append(round(time.perf_counter() - t, 4))
        img = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
    row = {"model": str(model), "engine": f"diffusers {__import__('diffusers').__version__} / torch "
           f"{torch.__version__} fp32 on {device}", "steps": steps, "guidance": guidance, "times": times,
           "best": min(times) if times else None,
           "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
           "gpu_mem_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
    if cpuflow_image is not None and cpuflow_image.shape == img.shape:
        row["psnr_vs_cpuflow_cuda_db"] = psnr_db(img, cpuflow_image)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True,
                    help="'default' (the shipped model) or FOLDER[=LABEL]; repeatable")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    ap.add_argument("--repeat", type=int, default=3, help="counted CUDA images after 1 warm-up")
    ap.add_argument("--cpu-repeat", type=int, default=1, help="counted CPU images after 1 warm-up")
    ap.add_argument("--variant", action="append", default=None,
                    help="variants to compare (default: the folder's default and fp32 when it has others)")
    ap.add_argument("--img2img", action="store_true")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--guidance", type=float, default=None, help="(default: the model's)")
    ap.add_argument("--torch-cuda", action="store_true",
                    help="also time diffusers on CUDA on the same weights (random-weights folders)")
    ap.add_argument("--tf32-off", action="store_true",
                    help="also run CUDA with the provider's TF32 off (how much of the difference TF32 makes)")
    ap.add_argument("--gpu-device", default="cuda", help="what stands for CUDA (cpu: a dry run of the script)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "rows": []}
    print(json.dumps(report["machine"]), flush=True)
    dest = args.out / "cuda_check.json"
    for spec in args.model:
        folder, _, label = spec.partition("=")
        model = None if folder == "default" else folder
        label = label or ("default" if model is None else Path(folder).name)
        variants = args.variant
        if variants is None:
            from cpuflow.manifest import load_manifest
            from cpuflow.pipelines.model import shipped_model_dir
            m = load_manifest(shipped_model_dir() if model is None else Path(model))
            has = {v for c in m.components.values() for v in c.variants}
            variants = [None, "fp32"] if has - {"fp32"} else [None]
        t = time.perf_counter()
        report["rows"] += check_model(model, label, args.out, gpu=args.gpu_device, steps=args.steps, size=args.size, repeat=args.repeat,
                                      cpu_repeat=args.cpu_repeat, variants=variants, img2img=args.img2img,
                                      seed=args.seed, guidance=args.guidance, tf32_off=args.tf32_off)
        print(f"[{label}] {time.perf_counter() - t:.1f} s", flush=True)
        dest.write_text(json.dumps(report, indent=1, default=str))
        if args.torch_cuda and model is not None:
            from PIL import Image
            first = next(r for r in report["rows"] if r["model"] == label and r["task"] == "txt2img")
            mine = np.asarray(Image.open(args.out / f"{label}-{first['variant']}-cuda.png").convert("RGB"))
            try:
                ref = torch_cuda_reference(model, device="cuda" if args.gpu_device == "cuda" else "cpu",
                                           steps=args.steps, size=args.size, repeat=args.repeat, seed=args.seed,
                                           guidance=7.5 if args.guidance is None else args.guidance,
                                           cpuflow_image=mine)
            except Exception as e:   # noqa: BLE001 - the reference is extra: its failure is reported, not fatal
                ref = {"model": str(model), "error": f"{type(e).__name__}: {e}"}
            report.setdefault("torch_cuda", []).append(ref)
            print("torch CUDA reference:", json.dumps(ref), flush=True)
        dest.write_text(json.dumps(report, indent=1, default=str))   # after each model: a timeout keeps what ran
    worst = min(r["psnr_cuda_vs_cpu_db"] for r in report["rows"])
    on_cuda = all(r["cuda"]["device_used"] == "CUDAExecutionProvider" for r in report["rows"])
    print(f"worst PSNR CUDA vs CPU: {worst:.1f} dB (target >= 40); every CUDA image on CUDAExecutionProvider: "
          f"{on_cuda}", flush=True)
    return 0 if worst >= 40 and on_cuda else 1


if __name__ == "__main__":
    sys.exit(main())
