"""``cpuflow bench --reference optimum-intel``: optimum-intel's OVStableDiffusionPipeline in a worker.

It needs torch (optimum-intel builds on diffusers' pipeline classes), so it lives in
the export stage, imported only inside the worker process started for this
reference (:mod:`cpuflow.bench.peers`), possibly under another interpreter
(``--peer-python``): optimum-intel 2.2 pins transformers < 5.6 and huggingface-hub
< 1.22, which this project's diffusers does not accept.

Static shapes as optimum-intel recommends for CPU latency: ``reshape(batch_size=1,
height, width, num_images_per_prompt=1)`` then ``compile()``; the UNet's batch
follows from the guidance (2 above 1). The per-image breakdown times the three
models' ``__call__`` (optimum-intel's OVModel wrappers), like the torch reference's
forward timers.
"""
from __future__ import annotations

import time
from typing import Any

from cpuflow.bench.peers import PEER_STAGES, check_same_unet, ov_properties, resolved_precision
from cpuflow.bench.worker import measure, memory_status
from cpuflow.errors import InvalidArgument

from .bench_reference import breakdown_row


class _CallTimer:
    """Wall time spent in an optimum-intel model part (OVModelPart.__call__ runs ``forward``), summed."""

    def __init__(self, model):
        self.seconds, self.calls = 0.0, 0
        inner = model.forward

        def forward(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        model.forward = forward

    def take(self) -> tuple[float, int]:
        s, c = self.seconds, self.calls
        self.seconds, self.calls = 0.0, 0
        return s, c


def run_optimum(spec: dict, progress) -> dict[str, Any]:
    t_imp = time.perf_counter()
    from optimum.intel.openvino import OVStableDiffusionPipeline
    import_s = time.perf_counter() - t_imp

    w, h, g = int(spec["width"]), int(spec["height"]), float(spec["guidance"])
    before = memory_status()
    t0 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(str(spec["source"]), compile=False, ov_config=ov_properties(spec))
    # optimum-intel's reshape gives the UNet batch 2 unconditionally (OVDiffusionPipeline._reshape_unet:
    # "the factor of 2 comes from the guidance scale > 1"): without guidance it must stay dynamic
    static = g > 1
    if static:
        pipe.reshape(batch_size=1, height=h, width=w, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    progress("load", load_s)
    out: dict[str, Any] = {"load_s": load_s, "import_s": import_s, "rss_before_load_bytes": before["rss"],
                           "load_from": f"optimum-intel folder {spec['source']}"}
    stage = spec["stage"]
    if stage == "load":
        out.update(times_s=[load_s], warmup_times_s=[], rss_after_load_bytes=memory_status()["rss"],
                   run_peak_rss_bytes=None)
    elif stage == "e2e":
        timers = {"text_encoder": _CallTimer(pipe.text_encoder), "unet": _CallTimer(pipe.unet),
                  "vae_decoder": _CallTimer(pipe.vae_decoder)}

        def one_image():
            for tm in timers.values():
                tm.take()
            pipe(prompt=spec["prompt"], num_inference_steps=int(spec["steps"]), guidance_scale=g,
                 height=h, width=w, output_type="pil")
            return breakdown_row(timers)

        breakdown: list[dict] = []
        out.update(measure(one_image, int(spec["warmup"]), int(spec["repeat"]), progress,
                           on_result=breakdown.append))
        out["breakdown"] = breakdown
        out["sampler"] = type(pipe.scheduler).__name__
    else:
        raise InvalidArgument(f"a peer reference measures the stages {', '.join(PEER_STAGES)}, not {stage!r}")
    from importlib.metadata import version
    out["peak_rss_bytes"] = memory_status()["hwm"]   # before the weights check reads anything
    if spec.get("check_weights") and spec.get("model"):
        out["weights_check"] = check_same_unet(spec["model"], spec["source"])
    out["sessions"] = {"pipeline": {"backend": f"optimum-intel {version('optimum-intel')}", "device": "CPU",
                                    "precision": resolved_precision(spec),
                                    "variant": "optimum IR, " + ("static" if static else "dynamic") + " shapes",
                                    "compile_s": None, "cached": False, "threads": spec.get("threads")}}
    return out
