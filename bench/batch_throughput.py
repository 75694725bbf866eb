"""Images per minute for many images on this machine (issue #18): plain `cpuflow generate`
in a loop, `cpuflow batch` locally with 1 and 2 worker processes, `cpuflow batch --ray` with
1 and 2 actors on a local Ray cluster (127.0.0.1), and what the driver itself costs per image
(PNG encode + atomic write + results and journal lines, all fsync'd) at 64, 512 and 1024 px.

    .venv/bin/python bench/batch_throughput.py [--n 40] [--steps 20] [--out /tmp/bt]

The shipped model (64x64, PNDM 20 steps, f32) unless --model. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # Ray on loopback only


def jobs_file(path: Path, n: int, steps: int, offset: int = 0) -> Path:
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    path.write_text("".join(json.dumps({"prompt": prompts[i % 2], "seed": offset + i, "steps": steps}) + "\n"
                            for i in range(n)))
    return path


def generate_loop(tmp: Path, n: int, steps: int, model) -> float:
    """A shell loop: one `cpuflow generate` process per image (compiled-model cache warm)."""
    cmd = [sys.executable, "-m", "cpuflow.cli", "generate", "a red circle on a blue background", "--steps",
           str(steps), "-q"] + (["--model", str(model)] if model else [])
    subprocess.run(cmd + ["--out", str(tmp / "warm.png")], check=True, capture_output=True)
    t0 = time.perf_counter()
    for i in range(n):
        subprocess.run(cmd + ["--seed", str(i), "--out", str(tmp / f"g{i}.png")], check=True, capture_output=True)
    return 60 * n / (time.perf_counter() - t0)


def batch_rate(tmp: Path, name: str, n: int, steps: int, model, **kw) -> float:
    import cpuflow.batch
    out = tmp / name
    shutil.rmtree(out, ignore_errors=True)
    # warm: the first job loads and compiles the model in each worker; time the rest
    stamps = []
    s = cpuflow.batch.run(jobs_file(tmp / f"{name}.jsonl", n, steps), out=out, model=model,
                          progress=lambda ev: stamps.append(time.perf_counter()) if ev["event"] == "image" else None,
                          **kw)
    assert s.written == n, s
    skip = max(2, kw.get("workers") or 1)      # the first image of each worker paid its model load
    return 60 * (len(stamps) - skip) / (stamps[-1] - stamps[skip - 1])


def driver_cost(tmp: Path, size: int, n: int = 20) -> dict:
    """Seconds per image the driver spends writing (no generation): save_png_atomic + 2 fsync'd lines."""
    import numpy as np
    from PIL import Image

    from cpuflow.batch.journal import OutputDir
    from cpuflow.batch.jobs import BatchJob
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))   # noise: worst case for PNG
    out = tmp / f"driver-{size}"
    shutil.rmtree(out, ignore_errors=True)
    with OutputDir.open(out, {"model_hash": "x"}) as od:
        t0 = time.perf_counter()
        for i in range(n):
            job = BatchJob(id=f"{i:020x}" + "0" * 44, source="bench", params={"seed": i}, request=None)
            od.write_done(job, img, {"prompt": "p", "seed": i}, seconds=0.0, worker="w")
        dt = (time.perf_counter() - t0) / n
    import io
    t0 = time.perf_counter()
    for i in range(n):
        img.save(io.BytesIO(), format="PNG")
    encode = (time.perf_counter() - t0) / n
    files = list((out / "images").iterdir())
    assert len(files) == n
    return {"size": size, "seconds_per_image": round(dt, 4), "png_encode_s": round(encode, 4), "png_bytes": sum(p.stat().st_size for p in files) // n}


def ray_transfer(size: int) -> float:
    """Seconds to get one HxWx3 uint8 image from an actor to the driver (Ray on this host)."""
    import numpy as np
    import ray

    @ray.remote(num_cpus=0)
    class Src:
        def img(self):
            return np.zeros((size, size, 3), np.uint8)
    a = Src.remote()
    ray.get(a.img.remote())
    t0 = time.perf_counter()
    for _ in range(10):
        ray.get(a.img.remote())
    ray.kill(a)
    return (time.perf_counter() - t0) / 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", default="", help="comma list of: loop,local,ray,driver")
    a = ap.parse_args()
    tmp = Path(a.out or tempfile.mkdtemp(prefix="cpuflow-batch-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    res = {"n": a.n, "steps": a.steps, "model": a.model or "shipped", "cpus": os.cpu_count(),
           "loadavg_start": os.getloadavg()}
    if "loop" not in skip:
        res["generate_loop_per_min"] = round(generate_loop(tmp, min(a.n, 10), a.steps, a.model), 1)
    if "local" not in skip:
        res["batch_local_1_per_min"] = round(batch_rate(tmp, "l1", a.n, a.steps, a.model), 1)
        res["batch_local_2_per_min"] = round(batch_rate(tmp, "l2", a.n, a.steps, a.model, workers=2), 1)
    if "driver" not in skip:
        res["driver"] = [driver_cost(tmp, s) for s in (64, 512, 1024)]
    if "ray" not in skip:
        import ray
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            for w in (1, 2):
                res[f"batch_ray_{w}_per_min"] = round(batch_rate(tmp, f"r{w}", a.n, a.steps, a.model, ray="auto",
                                                                 workers=w, cpus_per_worker=2 // w), 1)
            res["ray_transfer_s"] = {s: round(ray_transfer(s), 4) for s in (512, 1024)}
        finally:
            ray.shutdown()
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
