"""The torch side of ``cpuflow bench --reference torch``: diffusers on the same weights.

What most users run on a CPU: ``StableDiffusionPipeline`` in float32, with the
model's own scheduler, at the same size, steps and guidance as the cpuflow
configurations. It lives in the export stage because it needs torch; the
runtime imports it only in a bench worker process started for the reference
(:mod:`cpuflow.bench.worker`), never at import time.

The weights come from :func:`export.sources.load_source`: the source the model
was exported from (``--reference-source``), or for ``--arch`` the same random
architecture rebuilt with the same seed. Before its numbers count, a few
tensors are compared with the exported model's files (:func:`check_same_weights`),
so a ratio is never a comparison of two different models.

Stages (matching :mod:`cpuflow.bench.worker`): ``text`` one text-encoder call
(batch 1), ``unet`` one UNet call (batch 2 with guidance), ``vae`` one VAE
decode, ``e2e`` one whole image (``pipe(...)``), ``upscale`` one whole x4 upscale
(``StableDiffusionUpscalePipeline``, for an x4 upscaler folder), ``load`` building the pipeline
from the source (for random weights that is random initialisation: no file is
read, so it is not comparable with a load from disk).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cpuflow.bench.worker import UNET_TIMESTEP, Progress, measure, memory_status, unet_batch
from cpuflow.errors import ExportError
from cpuflow.manifest import load_manifest

# Parameters compared with the exported files: names as in the diffusers /
# transformers modules. Chosen because the ONNX exporter stores them unchanged
# (convolution weights, the token embedding) and their shapes are unique.
CHECKED_PARAMS = {
    "text_encoder": ("text_model.embeddings.token_embedding.weight",),
    "unet": ("conv_in.weight", "conv_out.weight"),
    "vae_decoder": ("post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"),
}


class WeightsMismatch(ExportError):
    """The torch reference's weights are not the exported model's."""


def _torch_module_of(loaded: Any, component: str):
    return {"text_encoder": loaded.text_encoder, "unet": loaded.unet, "vae_decoder": loaded.vae}[component]


def build_pipeline(spec: dict) -> tuple[Any, Any]:
    """(StableDiffusionPipeline, export.sources.LoadedSource) from spec's source,
    float32, eval mode, no safety checker, progress bar off."""
    import diffusers
    from transformers import CLIPTokenizer

    try:
        from cpuflow_export.sources import load_source
    except ImportError:
        from export.sources import load_source

    tokenizer = spec.get("tokenizer")  # a folder: needed by random weights and single files without one
    if spec.get("source"):
        loaded = load_source(spec["source"], allow_pickle=bool(spec.get("allow_pickle", False)),
                             tokenizer=tokenizer)
    else:
        loaded = load_source(None, random_weights=True, arch=spec["arch"], seed=int(spec.get("seed", 0)),
                             tokenizer=tokenizer)
    cfg = dict(loaded.scheduler_config)
    sched_cls = getattr(diffusers, str(cfg.get("_class_name", "PNDMScheduler")), diffusers.PNDMScheduler)
    if getattr(loaded, "family", None) == "x4-upscaler":
        pipe = diffusers.StableDiffusionUpscalePipeline(
            vae=loaded.vae, text_encoder=loaded.text_encoder, unet=loaded.unet,
            tokenizer=CLIPTokenizer.from_pretrained(str(loaded.tokenizer_dir)),
            low_res_scheduler=diffusers.DDPMScheduler.from_config(loaded.low_res_scheduler_config),
            scheduler=sched_cls.from_config(cfg), max_noise_level=int(loaded.max_noise_level))
        pipe.set_progress_bar_config(disable=True)
        return pipe, loaded
    # an inpainting UNet (9 channels) runs in diffusers' inpainting pipeline
    cls = diffusers.StableDiffusionInpaintPipeline if getattr(loaded, "unet_kind", "") == "inpaint" else \
        diffusers.StableDiffusionPipeline
    pipe = cls(
        vae=loaded.vae, text_encoder=loaded.text_encoder, unet=loaded.unet,
        tokenizer=CLIPTokenizer.from_pretrained(str(loaded.tokenizer_dir)),
        scheduler=sched_cls.from_config(cfg), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, loaded


# ---------------------------------------------------------------- same weights
def _exported_tensors(model_dir: Path, component: str, shapes: set[tuple[int, ...]]):
    """Yield (shape, float32 array) for every stored tensor of ``component``
    (fp32 variant) whose shape is in ``shapes``: ONNX initializers when the
    folder has ONNX files, else OpenVINO IR constants."""
    from cpuflow.manifest import load_manifest

    m = load_manifest(model_dir, verify=False)
    var = m.components[component].variants["fp32"]
    # tables stored beside the graph (a text encoder's token embeddings, manifest schema 2)
    folder = m.path(var.model_file("onnx" if "onnx" in var.files else "openvino")).parent
    for npy in sorted(folder.glob("*.npy")):
        arr = np.load(npy, allow_pickle=False)
        if tuple(arr.shape) in shapes:
            yield tuple(arr.shape), arr.astype(np.float32)
    if "onnx" in var.files:
        import onnx
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        path = m.path(var.model_file("onnx"))
        proto = onnx.load(str(path), load_external_data=False)
        for t in proto.graph.initializer:
            shape = tuple(int(d) for d in t.dims)
            if shape in shapes:
                if uses_external_data(t):
                    load_external_data_for_tensor(t, str(path.parent))
                yield shape, numpy_helper.to_array(t).astype(np.float32)
        return
    import openvino as ov

    model = ov.Core().read_model(str(m.path(var.model_file("openvino"))))
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            shape = tuple(int(d) for d in op.get_output_shape(0))
            if shape in shapes:
                yield shape, np.asarray(op.get_data()).astype(np.float32)


def check_same_weights(loaded: Any, model_dir: str | Path) -> dict[str, dict[str, bool]]:
    """Compare :data:`CHECKED_PARAMS` of the torch modules with the exported
    folder's stored tensors (exactly; fp16-stored weights after rounding the
    torch value to fp16). Raises :class:`WeightsMismatch` naming the first
    tensor that has no equal; returns ``{component: {param: True}}``."""
    from cpuflow.manifest import load_manifest

    model_dir = Path(model_dir)
    fp16 = load_manifest(model_dir, verify=False).raw.get("export", {}).get("weights_dtype") == "fp16"
    report: dict[str, dict[str, bool]] = {}
    for component, names in CHECKED_PARAMS.items():
        sd = _torch_module_of(loaded, component).state_dict()
        wanted = {}
        for n in names:
            # transformers 5 names CLIPTextModel's tensors without the "text_model." prefix
            keys = [k for k in sd if k == n or k.endswith("." + n) or n.endswith("." + k)]
            if not keys:
                raise WeightsMismatch(f"the torch {component} has no parameter {n}")
            t = sd[keys[0]].detach().float().cpu().numpy()
            wanted[n] = t.astype(np.float16).astype(np.float32) if fp16 else t
        found = {n: False for n in names}
        for shape, arr in _exported_tensors(model_dir, component, {w.shape for w in wanted.values()}):
            for n, w in wanted.items():
                if not found[n] and w.shape == shape and np.array_equal(w, arr):
                    found[n] = True
            if all(found.values()):
                break
        missing = [n for n, ok in found.items() if not ok]
        if missing:
            raise WeightsMismatch(
                f"the torch reference's {component}.{missing[0]} equals no tensor in {model_dir}: "
                "the reference weights are not the exported model's",
                hint="pass --reference-source with the source the model was exported from "
                     "(for --arch: delete the cached bench model so it is rebuilt)")
        report[component] = found
    return report


# ---------------------------------------------------------------- stages
class _ForwardTimer:
    """Wall time spent in a module's forward, summed (hooks; for e2e breakdowns)."""

    def __init__(self, module):
        self.seconds = 0.0
        self.calls = 0
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def take(self) -> tuple[float, int]:
        s, c = self.seconds, self.calls
        self.seconds, self.calls = 0.0, 0
        return s, c


def breakdown_row(timers: dict) -> dict[str, float]:
    """One image's seconds per component from timers with ``take() -> (seconds, calls)``
    (reset as read), plus the UNet's seconds per call."""
    row = {}
    for name, tm in timers.items():
        s, c = tm.take()
        row[name] = round(s, 6)
        if name == "unet" and c:
            row["unet_per_call"] = round(s / c, 6)
    return row


def run_reference(spec: dict, progress: Progress) -> dict[str, Any]:
    t_imp = time.perf_counter()
    import diffusers  # noqa: F401 - imported before the clock starts: "load" is building the pipeline only
    import torch
    import transformers  # noqa: F401
    import_s = time.perf_counter() - t_imp

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    stage = spec["stage"]
    before = memory_status()
    t0 = time.perf_counter()
    pipe, loaded = build_pipeline(spec)
    load_s = time.perf_counter() - t0
    progress("load", load_s)
    out: dict[str, Any] = {"load_s": load_s, "import_s": import_s, "rss_before_load_bytes": before["rss"],
                           "load_from": "random init (no file read)" if loaded.random_weights and not spec.get("source")
                           else f"{loaded.source.get('kind', 'source')}: {loaded.source.get('name', '')}"}
    w, h = int(spec["width"]), int(spec["height"])
    guidance = float(spec["guidance"])
    gen = torch.Generator("cpu").manual_seed(int(spec.get("gen_seed", 0)))
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    lat_shape = (1, int(pipe.vae.config.latent_channels), h // vae_scale, w // vae_scale)
    upscaler = getattr(loaded, "family", None) == "x4-upscaler"
    # the x4 upscaler's UNet also takes the noised low-res image (3 channels) and the noise level
    image = torch.rand((1, 3, *lat_shape[2:]), generator=gen) * 2 - 1 if upscaler else None
    # the UNet's batch as the runtime decides it (uses_cfg: the export's manifest says whether it
    # takes the guidance as an embedding)
    b = unet_batch(load_manifest(Path(spec["model"]), verify=False), guidance)
    labels = torch.tensor([int(spec.get("noise_level", 20))] * b) if upscaler else None

    with torch.inference_mode():
        if stage == "load":
            out.update(times_s=[load_s], warmup_times_s=[], rss_after_load_bytes=memory_status()["rss"],
                       run_peak_rss_bytes=None)
        elif stage == "text":
            ids = pipe.tokenizer(spec["prompt"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            out.update(measure(lambda: pipe.text_encoder(ids)[0], spec["warmup"], spec["repeat"], progress))
        elif stage == "unet":
            hidden = int(pipe.text_encoder.config.hidden_size)
            ehs = torch.randn((b, pipe.tokenizer.model_max_length, hidden), generator=gen)
            x = torch.randn(lat_shape, generator=gen)
            t = torch.tensor(UNET_TIMESTEP)
            w_emb = None  # an LCM UNet takes the guidance as an embedding, as diffusers' pipeline gives it
            if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
                w_emb = pipe.get_guidance_scale_embedding(torch.tensor([guidance - 1.0]),
                                                          embedding_dim=pipe.unet.config.time_cond_proj_dim)

            def unet_call():
                # as the diffusers pipeline does it: [uncond, cond] in one batch, then guidance
                inp = torch.cat([x] * b) if b == 2 else x
                if image is not None:
                    inp = torch.cat([inp, torch.cat([image] * b)], dim=1)
                noise = pipe.unet(inp, t, encoder_hidden_states=ehs, timestep_cond=w_emb, class_labels=labels,
                                  return_dict=False)[0]
                if b == 2:
                    u, c = noise.chunk(2)
                    noise = u + guidance * (c - u)
                return noise

            out.update(measure(unet_call, spec["warmup"], spec["repeat"], progress))
            out["unet_batch"] = b
        elif stage == "depth":   # the DPT depth estimator, as StableDiffusionDepth2ImgPipeline runs it
            pre = loaded.depth_preprocess
            pv = torch.rand((1, 3, pre["height"], pre["width"]), generator=gen) * 2 - 1
            out.update(measure(lambda: loaded.depth_estimator(pixel_values=pv).predicted_depth, spec["warmup"],
                               spec["repeat"], progress))
        elif stage == "vae":   # the VAE's latent channels (an inpainting UNet takes more)
            z = torch.randn((1, int(pipe.vae.config.latent_channels)) + lat_shape[2:], generator=gen)
            sf = float(pipe.vae.config.scaling_factor)
            out.update(measure(lambda: pipe.vae.decode(z / sf, return_dict=False)[0], spec["warmup"],
                               spec["repeat"], progress))
        elif stage == "e2e":
            def one_image(g):
                extra = {}
                if getattr(loaded, "unet_kind", "txt2img") == "inpaint":   # as cpuflow runs txt2img on it:
                    from PIL import Image                                   # an all-white mask (pipelines/inpaint.py)
                    extra = {"image": Image.new("RGB", (w, h), (128, 128, 128)),
                             "mask_image": Image.new("L", (w, h), 255), "strength": 1.0}
                pipe(prompt=spec["prompt"], num_inference_steps=int(spec["steps"]), guidance_scale=guidance,
                     width=w, height=h, generator=g, output_type="pil", **extra)

            out.update(_measure_whole_calls(pipe, spec, progress, one_image))
        elif stage == "upscale":   # the same input picture as cpuflow's worker
            from cpuflow.bench.worker import upscale_test_image
            small = upscale_test_image(w, h, vae_scale, int(spec.get("gen_seed", 0)))

            def one_upscale(g):
                pipe(prompt=spec["prompt"], image=small, num_inference_steps=int(spec["steps"]),
                     guidance_scale=guidance, noise_level=int(spec.get("noise_level", 20)), generator=g,
                     output_type="pil")

            out.update(_measure_whole_calls(pipe, spec, progress, one_upscale))
        else:
            raise ValueError(f"unknown stage {stage!r}")

    out["peak_rss_bytes"] = memory_status()["hwm"]  # before the weights check reads anything
    out["sessions"] = {"pipeline": {"backend": "torch", "device": "cpu", "precision": "f32", "variant": "fp32",
                                    "compile_s": None, "cached": False, "threads": torch.get_num_threads()}}
    out["versions"] = {"torch": torch.__version__}
    if spec.get("check_weights") and spec.get("model"):
        out["weights_check"] = check_same_weights(loaded, spec["model"])
    return out


def _measure_whole_calls(pipe, spec: dict, progress: Progress, call) -> dict[str, Any]:
    """Time ``call(generator)``, one whole diffusers pipeline call (an image, an upscale),
    with a fresh generator of spec's seed each time, and the per-component breakdown of each
    counted call (text encoder, UNet and its time per call, VAE decoder), as cpuflow's worker
    reports it for its e2e and upscale stages."""
    import torch

    timers = {"text_encoder": _ForwardTimer(pipe.text_encoder), "unet": _ForwardTimer(pipe.unet),
              "vae_decoder": _ForwardTimer(pipe.vae.decoder)}
    breakdown: list[dict] = []

    def one():
        for tm in timers.values():
            tm.take()
        call(torch.Generator("cpu").manual_seed(int(spec.get("gen_seed", 0))))
        return breakdown_row(timers)

    out = measure(one, spec["warmup"], spec["repeat"], progress, on_result=breakdown.append)
    return dict(out, breakdown=breakdown, sampler=type(pipe.scheduler).__name__)
