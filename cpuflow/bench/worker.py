"""One measurement in a process of its own: ``python -m cpuflow.bench.worker SPEC.json OUT.json``.

The runner starts one worker per (configuration, stage) -- and one per start
for the load stage -- so that

* the peak RSS a worker reports (``VmHWM`` of its own process) belongs to that
  stage alone and never mixes with another stage's peak;
* "first start" really is a fresh process with an empty compiled-model cache,
  and "second start" a fresh process that finds the cache the first one wrote.

SPEC is a JSON object (written by :mod:`cpuflow.bench.runner`)::

    kind        "cpuflow" | "torch" | "genai" | "optimum-intel"   (torch: the diffusers reference, see
                export/bench_reference.py; genai / optimum-intel: the peers, cpuflow/bench/peers.py)
    stage       "text" | "unet" | "vae" | "taesd" | "e2e" | "upscale" | "load"   (taesd: the tiny autoencoder's
                decode; "text" runs both text encoders of an SDXL model, "unet" passes SDXL's extra inputs and
                the x4 upscaler's (the noised low-res image, the noise level); "upscale": one whole x4 upscale,
                the x4 upscaler's e2e, to width x height from a quarter of that)
    model       exported model folder (cpuflow; torch: for the same-weights check)
    backend, device, precision, variant, threads, cache_dir      (cpuflow)
    source, arch, seed                                            (torch)
    source (an optimum-intel folder), precision, threads          (genai, optimum-intel)
    width, height, steps, guidance, prompt, gen_seed, warmup, repeat

OUT receives one JSON object: ``ok``, the timings (``times_s``: one per counted
repetition, ``warmup_times_s``), memory (``peak_rss_bytes``: VmHWM at the end;
``rss_after_load_bytes``; ``run_peak_rss_bytes``: the peak during warm-up and
repetitions only, when the kernel lets us reset the peak), ``sessions`` (what
each component really ran on) and, on failure, ``error``/``error_type``.
Progress goes to stdout as lines starting with :data:`PROGRESS_PREFIX`.

This module imports only torch-free parts of cpuflow at import time.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..memory import memory_status

PROGRESS_PREFIX = "@@cpuflow-bench-progress "
STAGES = ("text", "unet", "vae", "taesd", "e2e", "upscale", "load", "depth")   # depth: a depth model's estimator
DEFAULT_STAGES = ("text", "unet", "vae", "e2e", "load")   # taesd only when asked: not every folder has it
UNET_TIMESTEP = 500.0   # any value: latency does not depend on it


# ---------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``5`` into clear_refs).
    False where that is not possible; then only the whole-process peak is known."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- progress and timing
class Progress:
    """Tells the runner (reading our stdout) that one unit of work is done."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def __call__(self, what: str, seconds: float | None = None) -> None:
        msg = {"what": what}
        if seconds is not None:
            msg["seconds"] = round(seconds, 6)
        self.stream.write(PROGRESS_PREFIX + json.dumps(msg) + "\n")
        self.stream.flush()


def upscale_test_image(width: int, height: int, factor: int, seed: int):
    """The upscale stage's input, the same for cpuflow and the torch reference
    (export/bench_reference.py): a smooth random picture of width x height / factor."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // factor // 8), max(1, width // factor // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width // factor, height // factor), Image.Resampling.BICUBIC)


def measure(fn: Callable[[], Any], warmup: int, repeat: int, progress: Progress,
            on_result: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times uncounted, then ``repeat`` times counted;
    wall-clock seconds of each call. The peak RSS is reset first (after the
    model is loaded), so ``run_peak_rss_bytes`` is what the calls themselves
    need on top of the loaded model. ``on_result`` sees each counted call's
    return value (e.g. a per-stage breakdown of a whole image)."""
    after_load = memory_status()
    reset_ok = reset_peak_rss()
    warm: list[float] = []
    times: list[float] = []
    for i in range(warmup + repeat):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        if i < warmup:
            warm.append(dt)
            progress("warmup", dt)
        else:
            times.append(dt)
            if on_result is not None:
                on_result(res)
            progress("repeat", dt)
    end = memory_status()
    return {"warmup_times_s": warm, "times_s": times, "rss_after_load_bytes": after_load["rss"],
            "run_peak_rss_bytes": end["hwm"] if reset_ok else None}


# ---------------------------------------------------------------- cpuflow stages
def session_dims(model, spec: dict) -> dict[str, dict[str, int]]:
    """The static shapes a txt2img of spec's size compiles, exactly as
    :func:`cpuflow.pipelines.generate.generate` asks for them (so the
    compiled-model cache written by one worker is found by the next)."""
    from ..prompt_encoding import text_length_dims
    w, h = int(spec["width"]), int(spec["height"])
    lat = model.latent_dims(w, h, 1)
    return {"text_encoder": {"batch": 1}, "text_encoder_2": {"batch": 1},   # the second: SDXL
            "unet": dict(lat, batch=unet_batch(model.manifest, spec["guidance"]),
                         **text_length_dims(model, 77)),  # one prompt chunk
            "vae_decoder": dict(lat), "taesd_decoder": dict(lat), "depth_estimator": {"batch": 1}}


def unet_batch(manifest, guidance: float) -> int:
    """The UNet's batch at ``guidance``: 2 ([uncond, cond]) where the runtime runs a negative
    branch, else 1. Decided by the runtime's own :func:`cpuflow.pipelines.run.uses_cfg`
    (the bench runner, this worker and the torch reference all ask here)."""
    from ..pipelines.run import uses_cfg
    return 2 if uses_cfg(manifest, float(guidance)) else 1


STAGE_COMPONENTS = {"text": ("text_encoder",), "unet": ("unet",), "vae": ("vae_decoder",), "taesd": ("taesd_decoder",),
                    "depth": ("depth_estimator",),
                    "e2e": ("text_encoder", "unet", "vae_decoder"), "upscale": ("text_encoder", "unet", "vae_decoder"),
                    "load": ("text_encoder", "unet", "vae_decoder")}


def stage_components(model, stage: str) -> tuple[str, ...]:
    """The components a stage loads: STAGE_COMPONENTS, plus SDXL's second text
    encoder wherever the first one is used."""
    comps = STAGE_COMPONENTS[stage]
    if model.manifest.family == "sdxl" and "text_encoder" in comps:
        i = comps.index("text_encoder") + 1
        comps = comps[:i] + ("text_encoder_2",) + comps[i:]
    return comps


def session_facts(model) -> dict[str, dict]:
    """What each loaded component really ran: backend, device, precision,
    variant, compile seconds, cache hit, threads (where the backend says)."""
    out = {}
    for name, _, sess in model.loaded_sessions():
        info = sess.info
        d = {"backend": info.backend, "device": info.device, "precision": info.precision,
             "variant": getattr(sess, "variant", "fp32"), "compile_s": round(float(info.compile_s), 4),
             "cached": bool(info.cached), "threads": None}
        getp = getattr(sess, "get_property", None)
        if callable(getp):
            try:
                d["threads"] = int(getp("INFERENCE_NUM_THREADS"))
            except Exception:  # noqa: BLE001 - a backend without the property: left unknown
                pass
        out[name] = d
    return out


def run_cpuflow(spec: dict, progress: Progress) -> dict[str, Any]:
    import numpy as np

    from ..config import GenerationRequest, LoadConfig
    from ..pipelines.generate import generate
    from ..pipelines.model import LoadedModel, StageTimer
    from ..pipelines.stages import decode_latents, encode_prompt

    stage = spec["stage"]
    cache_dir = spec.get("cache_dir")
    cfg = LoadConfig(model=Path(spec["model"]), backend=spec["backend"], device=spec.get("device", "auto"),
                     precision=spec["precision"], threads=spec.get("threads"), variant=spec.get("variant"),
                     cache_dir=Path(cache_dir) if cache_dir else None, use_cache=bool(cache_dir))
    # Import the backend's package before the clock starts, as the reference
    # imports torch and diffusers first: "load" is reading + compiling only.
    t_imp = time.perf_counter()
    __import__("openvino" if cfg.backend == "openvino" else "onnxruntime")
    import_s = time.perf_counter() - t_imp
    before = memory_status()
    t0 = time.perf_counter()
    model = LoadedModel(cfg)
    dims = session_dims(model, spec)
    decoder = spec.get("decoder", "full")
    for comp in stage_components(model, stage):
        if comp == "vae_decoder" and stage == "e2e" and decoder == "taesd":
            comp = "taesd_decoder"
        model.session(comp, dims[comp])
    load_s = time.perf_counter() - t0
    progress("load", load_s)
    out: dict[str, Any] = {"load_s": load_s, "import_s": import_s, "rss_before_load_bytes": before["rss"]}
    timer = StageTimer()
    w, h = int(spec["width"]), int(spec["height"])
    rng = np.random.default_rng(int(spec.get("gen_seed", 0)))

    if stage == "load":
        out.update(times_s=[load_s], warmup_times_s=[], rss_after_load_bytes=memory_status()["rss"],
                   run_peak_rss_bytes=None)
    elif stage == "text":
        prompt = spec["prompt"]   # SDXL: both text encoders, one call each
        out.update(measure(lambda: encode_prompt(model, prompt, timer), spec["warmup"], spec["repeat"], progress))
    elif stage == "unet":
        out.update(measure(_unet_call(model, spec, rng), spec["warmup"], spec["repeat"], progress))
        out["unet_batch"] = unet_batch(model.manifest, spec["guidance"])
    elif stage == "upscale":
        from ..config import UpscaleRequest
        from ..pipelines.upscale import upscale
        factor = int(model.manifest.raw["upscaler"]["factor"])
        small = upscale_test_image(w, h, factor, int(spec.get("gen_seed", 0)))
        req = UpscaleRequest(image=small, prompt=spec["prompt"], steps=int(spec["steps"]),
                             guidance=float(spec["guidance"]), seed=int(spec.get("gen_seed", 0)),
                             noise_level=int(spec.get("noise_level", 20)), tile=spec.get("tile"))
        breakdown = []
        keep = ("text_encoder", "unet", "unet_per_call", "vae_decoder")
        out.update(measure(lambda: upscale(model, req), spec["warmup"], spec["repeat"], progress,
                           on_result=lambda r: breakdown.append(
                               {k: round(float(v), 6) for k, v in r.timings.items() if k in keep})))
        out["breakdown"] = breakdown
        out["sampler"] = model.default_sampler()
    elif stage == "vae":
        lat = model.latent_dims(w, h, 1)
        z = rng.standard_normal((1, model.manifest.latent_channels, lat["latent_height"], lat["latent_width"]),
                                dtype=np.float32)
        out.update(measure(lambda: decode_latents(model, z, w, h, timer), spec["warmup"], spec["repeat"], progress))
    elif stage == "taesd":
        from ..pipelines.taesd import decode_taesd
        lat = model.latent_dims(w, h, 1)
        z = rng.standard_normal((1, model.manifest.latent_channels, lat["latent_height"], lat["latent_width"]),
                                dtype=np.float32)
        out.update(measure(lambda: decode_taesd(model, z, timer), spec["warmup"], spec["repeat"], progress))
    elif stage == "depth":   # the depth estimator on one preprocessed image (cpuflow/pipelines/depth.py)
        est = model.manifest.components["depth_estimator"]
        pv = rng.uniform(-1, 1, est.input("pixel_values").resolve({"batch": 1})).astype(np.float32)
        out.update(measure(lambda: model.run("depth_estimator", {"batch": 1}, {"pixel_values": pv}),
                           spec["warmup"], spec["repeat"], progress))
    elif stage == "e2e":
        req = GenerationRequest(prompt=spec["prompt"], steps=int(spec["steps"]), guidance=float(spec["guidance"]),
                                width=w, height=h, seed=int(spec.get("gen_seed", 0)), decoder=decoder)
        breakdown: list[dict] = []
        keep = ("text_encoder", "unet", "unet_per_call", "vae_decoder", "taesd_decoder")
        out.update(measure(lambda: generate(model, req), spec["warmup"], spec["repeat"], progress,
                           on_result=lambda r: breakdown.append(
                               {k: round(float(v), 6) for k, v in r.timings.items() if k in keep})))
        out["breakdown"] = breakdown
        out["sampler"] = model.default_sampler()
        out["decoder"] = decoder
    else:
        raise ValueError(f"unknown stage {stage!r}")
    out["sessions"] = session_facts(model)
    model.close()
    return out


def text_shape(unet) -> tuple[int, ...]:
    """One prompt chunk's UNet text input shape (batch 1, 77 tokens)."""
    spec = unet.input("encoder_hidden_states")
    return spec.resolve({"batch": 1, **({spec.shape[1]: 77} if isinstance(spec.shape[1], str) else {})})


def _unet_call(model, spec: dict, rng):
    """One guided UNet call as a generation makes it: the runtime's own request run
    (pipelines/run.py ``Run.guided``: SDXL's pooled text_embeds and time ids, an LCM UNet's
    guidance embedding, batch 2 only where ``uses_cfg`` says so) over random prompt
    encodings of one 77-token chunk; the x4 upscaler: its ``upscale_model_fn`` over a random
    low-res image (the latents' size) at spec's noise level (20). The latents: the UNet's own
    input channels (9 for an inpainting UNet, 5 for a depth one; the upscaler's image is
    concatenated by its model function)."""
    import numpy as np

    from ..config import GenerationRequest
    from ..pipelines.run import Conditioning, Run
    from ..pipelines.upscale import is_upscaler, upscale_model_fn
    from ..prompt_encoding import EncodedPrompt

    unet = model.manifest.components["unet"]
    pooled = unet.input("text_embeds") if "text_embeds" in [i.name for i in unet.inputs] else None
    req = GenerationRequest(prompt=spec["prompt"], steps=int(spec["steps"]), guidance=float(spec["guidance"]),
                            width=int(spec["width"]), height=int(spec["height"]), watermark=False)
    run = Run(model, req, "upscale" if is_upscaler(model) else "txt2img")

    def prompt():
        return EncodedPrompt(rng.standard_normal(text_shape(unet), dtype=np.float32),
                             None if pooled is None else rng.standard_normal(pooled.resolve({"batch": 1}),
                                                                             dtype=np.float32))
    cond = prompt()
    uncond = prompt() if run.do_cfg else None
    _, _, lh, lw = run.latent_shape()
    channels = model.manifest.latent_channels if is_upscaler(model) else int(unet.input("sample").shape[1])
    x = rng.standard_normal((1, channels, lh, lw), dtype=np.float32)
    if is_upscaler(model):
        image = rng.uniform(-1, 1, (1, int(model.manifest.raw["upscaler"]["image_channels"]), lh, lw))
        fn = upscale_model_fn(model, cond.embeddings, None if uncond is None else uncond.embeddings,
                              run.params["guidance"], image.astype(np.float32), int(spec.get("noise_level", 20)),
                              None, run.timer)
    else:
        fn = run.guided(Conditioning(spec["prompt"], "", cond, uncond))
    return lambda: fn(x, UNET_TIMESTEP)


# ---------------------------------------------------------------- entry point
def _reference_module():
    """The torch side lives in the export stage (it needs torch); imported only here."""
    try:
        from cpuflow_export import bench_reference  # installed package
    except ImportError:
        from export import bench_reference  # a source checkout
    return bench_reference


def run_spec(spec: dict, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Progress()
    if spec.get("stage") not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {spec.get('stage')!r}")
    if spec.get("kind", "cpuflow") == "torch":
        res = _reference_module().run_reference(spec, progress)
    elif spec.get("kind") in ("genai", "optimum-intel"):   # the peers (cpuflow/bench/peers.py)
        from .peers import run_peer
        res = run_peer(spec, progress)
    else:
        res = run_cpuflow(spec, progress)
    mem = memory_status()
    res.setdefault("peak_rss_bytes", mem["hwm"])  # the reference sets it before its weights check
    res.update(ok=True, stage=spec["stage"], rss_end_bytes=mem["rss"], pid=os.getpid())
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m cpuflow.bench.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    try:
        res = run_spec(spec)
        rc = 0
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the runner as data
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {"ok": False, "stage": spec.get("stage"), "error": str(e) or type(e).__name__,
               "error_type": type(e).__name__, "traceback": traceback.format_exc(limit=20),
               "peak_rss_bytes": memory_status()["hwm"]}
        print(res["traceback"], file=sys.stderr)
        rc = 1
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, out_path)
    return rc


if __name__ == "__main__":
    sys.exit(main())
