"""DeepCache's speed through cpuflow itself, interleaved (issue #15 item 4).

Loads a folder exported with ``--deep-cache`` once, makes one warm-up image per
setting (so every graph is compiled before anything is timed), then times the
settings in interleaved rounds (off, N=2, N=3, N=5, off, N=2, ...), so a change
of machine load hits every setting alike. Reports the best and the median of
each, the speed-up against full compute (off) from the best times, and the PSNR
of each setting's image against full compute (same seed, same everything else).

    python bench/deepcache_speed.py /work/bigexport/sd15-dc --steps 20 --rounds 3 \\
        --json bench/results/deepcache-speed-sd15.json

Random-weight models make noise images: the PSNR bounds the numerical deviation
DeepCache brings, not picture quality (bench/deepcache_default_model.py judges
the trained shipped model).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--every", "everies", multiple=True, type=int, default=(2, 3, 5), show_default=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--sampler", default=None, help="default: the model's")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--size", default=None, type=int, help="default: the model's default size")
@click.option("--rounds", default=3, show_default=True)
@click.option("--backend", default="openvino", show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--prompt", default="a lighthouse on a cliff at dawn, photograph", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(model, everies, steps, sampler, guidance, size, rounds, backend, precision, threads, prompt, json_out):
    from cpuflow import cpu
    from cpuflow.api import Pipeline

    pipe = Pipeline.load(str(model), backend=backend, precision=precision, threads=threads)
    params = {"steps": steps, "guidance": guidance, "seed": 1, "watermark": False}
    if sampler:
        params["sampler"] = sampler
    if size:
        params["width"] = params["height"] = size
    settings = [None, *everies]
    name = {n: ("off" if n is None else f"N={n}") for n in settings}

    def run(n):
        t0 = time.perf_counter()
        res = pipe.txt2img(prompt, deep_cache=n, **params)
        return time.perf_counter() - t0, np.asarray(res.images[0].convert("RGB")), res.records[0]

    images, times, ran = {}, {n: [] for n in settings}, None
    for n in settings:                                   # warm-up: compiles every graph
        dt, img, rec = run(n)
        images[n] = img
        ran = ran or rec
        print(f"warm-up {name[n]}: {dt:.1f} s", file=sys.stderr, flush=True)
    for r in range(rounds):
        for n in settings:
            dt, img, _ = run(n)
            if not np.array_equal(img, images[n]):
                raise SystemExit(f"{name[n]}: the image changed between runs (seeded: it must not)")
            times[n].append(dt)
            print(f"round {r + 1} {name[n]}: {dt:.2f} s", file=sys.stderr, flush=True)
    best_off = min(times[None])
    rows = [{"deep_cache": name[n], "best_s": round(min(times[n]), 2),
             "median_s": round(statistics.median(times[n]), 2), "all_s": [round(t, 2) for t in times[n]],
             "speedup_vs_off": round(best_off / min(times[n]), 2),
             "psnr_db_vs_off": None if n is None else round(psnr(images[n], images[None]), 2)}
            for n in settings]
    size_s = f"{images[None].shape[1]}x{images[None].shape[0]}"
    out = {"model": str(model), "backend": backend, "precision_asked": precision,
           "precision_ran": ran.get("precision"), "threads": threads, "steps": steps,
           "sampler": ran.get("sampler"), "guidance": guidance, "size": size_s, "rounds": rounds,
           "cpu": cpu.describe(), "rows": rows}
    print(f"{model.name}, {size_s}, {steps} steps {ran.get('sampler')}, guidance {guidance}, {backend} "
          f"{ran.get('precision')}, {threads} threads; CPU: {out['cpu']}")
    print("| deep cache | best s / image | median | speed-up (best) | PSNR vs off |")
    print("|---|---|---|---|---|")
    for r in rows:
        ps = "-" if r["psnr_db_vs_off"] is None else f"{r['psnr_db_vs_off']:.1f} dB"
        print(f"| {r['deep_cache']} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['speedup_vs_off']:.2f}x | {ps} |")
    if json_out:
        json_out.write_text(json.dumps(out, indent=2) + "\n")
    pipe.close()


if __name__ == "__main__":
    main()
