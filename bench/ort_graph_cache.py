"""Issue #16 item 12: ONNX Runtime's start with and without the saved optimised graph.

Each start runs in a fresh process (so nothing is warm in this one), on a
model folder's UNet ONNX at fixed shapes, and reports: session creation seconds,
whether the graph came from cpuflow's cache, and the median of a few UNet calls
(the step time must not change). Three kinds of start, interleaved in rounds:

* ``plain``: no cache (``--no-cache``; what every start did before the cache)
* ``first``: an empty cache: optimise, then save the graph
* ``second``: the cache the ``first`` start of the same round wrote

    python bench/ort_graph_cache.py MODEL_DIR --dims batch=2,latent_height=64,latent_width=64,text_length=77 \
        --rounds 2 --calls 2 --json bench/results/ort_graph_cache.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def one_start(model_dir: str, dims: dict, cache_dir: str | None, calls: int, threads: int | None) -> dict:
    import numpy as np

    from cpuflow.backends.base import BackendOptions, get_backend
    from cpuflow.manifest import load_manifest
    from cpuflow.memory import memory_status

    m = load_manifest(model_dir, verify=False)
    comp = m.components["unet"]
    files = comp.variants["fp32"].files["onnx"]
    backend = get_backend("onnxruntime", BackendOptions(threads=threads, cache_dir=cache_dir))
    t0 = time.perf_counter()
    sess = backend.load("unet", m.path(files[0]), comp.inputs, comp.outputs, static_dims=dims,
                        cache_key=f"bench-{os.path.basename(os.path.abspath(model_dir))}-unet-fp32")
    start_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    feeds = {}
    for s in comp.inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in s.shape]
        if s.dtype == "int64":
            feeds[s.name] = np.full(shape, 20, np.int64)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
    times = []
    out = None
    for _ in range(calls):
        t = time.perf_counter()
        out = sess.run(feeds)
        times.append(time.perf_counter() - t)
    return {"start_s": start_s, "cached": sess.info.cached, "warning": sess.info.warning,
            "call_s": times, "out_checksum": float(np.abs(next(iter(out.values()))).sum()),
            "peak_rss_bytes": memory_status().get("hwm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--dims", required=True, help="name=value,... for the UNet's symbolic dims")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    dims = {k: int(v) for k, v in (kv.split("=") for kv in a.dims.split(","))}
    if a.child is not None:
        cache = None if a.child == "-" else a.child
        print(json.dumps(one_start(a.model_dir, dims, cache, a.calls, a.threads)))
        return
    from cpuflow.cpu import describe
    rows = []
    for r in range(a.rounds):
        cache = tempfile.mkdtemp(prefix="ortc-")
        try:
            for kind, arg in (("plain", "-"), ("first", cache), ("second", cache)):
                cmd = [sys.executable, __file__, a.model_dir, "--dims", a.dims, "--calls", str(a.calls),
                       "--child", arg] + (["--threads", str(a.threads)] if a.threads else [])
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                res.update(kind=kind, round=r, load_avg=os.getloadavg()[0])
                rows.append(res)
                print(f"round {r} {kind:6s} start {res['start_s']:7.2f} s  cached {res['cached']!s:5s}  "
                      f"call median {statistics.median(res['call_s']):6.2f} s  load {res['load_avg']:.1f}",
                      flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    summary = {k: {"start_s_best": min(x["start_s"] for x in rows if x["kind"] == k),
                   "call_s_best": min(min(x["call_s"]) for x in rows if x["kind"] == k)}
               for k in ("plain", "first", "second")}
    same = len({round(x["out_checksum"], 3) for x in rows}) == 1
    print(json.dumps(summary, indent=1), "outputs identical across kinds:", same)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": describe(), "model_dir": a.model_dir, "dims": dims, "rows": rows,
                       "summary": summary, "outputs_identical": same}, f, indent=1)


if __name__ == "__main__":
    main()
