"""SDXL end to end: a tiny random SDXL (tests/helpers_sdxl.py) saved as a diffusers
folder, exported once to both formats (the export's gate checks every component
against torch), then cpuflow's images compared with diffusers'
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the same weights,
float32, >= 50 dB PSNR, both backends.

Random weights: these prove plumbing and numerics, not image quality.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_images import psnr  # noqa: E402
from helpers_sdxl import save_tiny_sdxl_folder  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.errors import InvalidArgument, SourceError  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
STEPS = 5
PROMPT = "a photo of a red car"
BACKENDS = ["openvino", "onnxruntime"]

REFERENCE = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
}


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_export):
    """(diffusers folder, exported folder, diffusers pipeline): exported once for the session."""
    src, out = tiny_sdxl_export.src, tiny_sdxl_export.model
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return src, out, pipe


_PIPES: dict = {}


def _cpuflow(out, backend):
    key = (str(out), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(out, backend=backend, precision="f32", threads=1, use_cache=False)
    return _PIPES[key]


def _reference(pipe, sampler, *, negative=None, guidance=5.0, init=None, strength=0.6, seed=3):
    cls_name, overrides = REFERENCE[sampler]
    sched = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    kw = dict(prompt=PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    comps = dict(pipe.components, scheduler=sched)
    if init is None:
        p = diffusers.StableDiffusionXLPipeline(**comps, add_watermarker=False)
        p.register_to_config(force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
        p.set_progress_bar_config(disable=True)
        img = p(height=SIZE, width=SIZE, **kw).images[0]
    else:
        p = diffusers.StableDiffusionXLImg2ImgPipeline(**comps, add_watermarker=False)
        p.register_to_config(force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
        p.set_progress_bar_config(disable=True)
        img = p(image=init, strength=strength, **kw).images[0]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_export_manifest(sdxl):
    _, out, _ = sdxl
    m = json.loads((out / "cpuflow.json").read_text())
    assert m["family"] == "sdxl" and m["validated"] is True
    assert set(m["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert m["default_size"] == {"width": SIZE, "height": SIZE}           # unet sample_size 8 x VAE 8
    assert m["latent"]["scaling_factor"] == pytest.approx(0.13025)
    assert m["sdxl"]["force_zeros_for_empty_prompt"] is True
    assert m["sdxl"]["requires_aesthetics_score"] is False
    assert m["defaults"] == {"guidance": 5.0}                               # diffusers' SDXL default
    assert m["tokenizer"]["pad_token_id"] != m["tokenizer_2"]["pad_token_id"]   # tokenizer_2 pads with "!"
    unet = {s["name"]: s["shape"] for s in m["components"]["unet"]["inputs"]}
    assert unet["encoder_hidden_states"] == ["batch", "text_length", 96]    # 32 + 64; 77 x prompt chunks
    assert unet["text_embeds"] == ["batch", 32] and unet["time_ids"] == ["batch", 6]
    te2 = [s["name"] for s in m["components"]["text_encoder_2"]["outputs"]]
    assert te2 == ["penultimate_hidden_states", "hidden_states", "text_embeds"]
    for comp in m["components"].values():
        for fmt in ("onnx", "openvino"):
            assert comp["variants"]["fp32"]["parity"][fmt]["passed"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_txt2img_negative_prompt_matches_diffusers(sdxl, backend):
    _, out, pipe = sdxl
    ref = _reference(pipe, "euler", negative="blurry, ugly")
    res = _cpuflow(out, backend).txt2img(PROMPT, watermark=False, negative_prompt="blurry, ugly", steps=STEPS, sampler="euler",
                                         guidance=5.0, width=SIZE, height=SIZE, seed=3)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{backend}: {p:.1f} dB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_txt2img_empty_negative_is_zeros_as_diffusers(sdxl, backend):
    """cpuflow's empty negative prompt = diffusers' none given: zeros (force_zeros_for_empty_prompt)."""
    _, out, pipe = sdxl
    ref = _reference(pipe, "euler", negative=None)
    res = _cpuflow(out, backend).txt2img(PROMPT, watermark=False, steps=STEPS, sampler="euler", guidance=5.0, width=SIZE,
                                         height=SIZE, seed=3)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{backend}: {p:.1f} dB"
    # and it differs from encoding "" (what a model without force_zeros does)
    other = _reference(pipe, "euler", negative="")
    assert psnr(other, ref) < PSNR_MIN


@pytest.mark.parametrize("sampler", [s for s in REFERENCE if s != "euler"])
def test_samplers_match_diffusers(sdxl, sampler):
    _, out, pipe = sdxl
    ref = _reference(pipe, sampler, negative="blurry")
    res = _cpuflow(out, "onnxruntime").txt2img(PROMPT, watermark=False, negative_prompt="blurry", steps=STEPS, sampler=sampler,
                                               guidance=5.0, width=SIZE, height=SIZE, seed=3)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{sampler}: {p:.1f} dB"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(sdxl, backend, sampler):
    from PIL import Image
    _, out, pipe = sdxl
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = _reference(pipe, sampler, negative="blurry", init=init, strength=0.6)
    res = _cpuflow(out, backend).img2img(PROMPT, init, watermark=False, negative_prompt="blurry", strength=0.6, steps=STEPS,
                                         sampler=sampler, guidance=5.0, seed=3)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"img2img {sampler} {backend}: {p:.1f} dB"


def test_no_guidance_runs_the_unet_at_batch_1(sdxl):
    _, out, pipe = sdxl
    ref = _reference(pipe, "euler", guidance=1.0)
    with Pipeline.load(out, backend="onnxruntime", threads=1, use_cache=False) as cf:
        res = cf.txt2img(PROMPT, watermark=False, steps=STEPS, sampler="euler", guidance=1.0, seed=3)   # default size
        unet_dims = [d for name, d, _ in cf.model.loaded_sessions() if name == "unet"]
    assert res.images[0].size == (SIZE, SIZE)
    assert psnr(np.asarray(res.images[0]), ref) >= PSNR_MIN
    assert all(d["batch"] == 1 for d in unet_dims)


def test_cli_generates_from_an_sdxl_folder(sdxl, tmp_path):
    from click.testing import CliRunner

    from cpuflow.cli import main
    _, out, _ = sdxl
    png = tmp_path / "x.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(out), PROMPT, "--steps", "2", "--seed", "1",
                                  "--backend", "onnxruntime", "--out", str(png)])
    assert r.exit_code == 0, r.output
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (SIZE, SIZE)
        rec = json.loads(im.info["cpuflow"])
    assert rec["guidance"] == 5.0 and rec["steps"] == 2


def test_single_file_sdxl_is_refused_with_advice(tmp_path):
    from safetensors.torch import save_file

    from export.sources import load_source
    f = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(2)}, str(f))
    with pytest.raises(SourceError, match="SDXL single-file.*not supported yet.*diffusers folder"):
        load_source(f)


def test_sdxl_folder_with_wrong_arch_is_refused(sdxl):
    from export.sources import load_source
    src, _, _ = sdxl
    with pytest.raises(SourceError, match="SDXL.*arch=sd15"):
        load_source(str(src), arch="sd15")


def test_bad_size_is_a_clear_error(sdxl):
    _, out, _ = sdxl
    with pytest.raises(InvalidArgument, match="multiple of 8"):
        _cpuflow(out, "onnxruntime").txt2img(PROMPT, steps=1, width=60, height=64)


def test_vendored_sdxl_configs_are_sdxl_base():
    """export/configs/sdxl builds SDXL base's modules: the published parameter counts."""
    from accelerate import init_empty_weights

    from export.sources_sdxl import _text_model, load_vendored
    cfg = load_vendored()
    counts = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    with init_empty_weights():
        for comp, n in counts.items():
            assert sum(p.numel() for p in _text_model(comp, cfg[comp], empty=True).parameters()) == n, comp
    assert cfg["vae"]["scaling_factor"] == 0.13025
    assert cfg["unet"]["sample_size"] * 8 == 1024
    assert cfg["model_index"]["force_zeros_for_empty_prompt"] is True


def test_random_weights_arch_sdxl(monkeypatch, tmp_path):
    """--random-weights --arch sdxl: the vendored configs (here swapped for the tiny ones, the
    full size takes ~14 GB), tokenizer_2 made from the given tokenizer with SDXL's "!" padding."""
    from helpers_sdxl import tiny_sdxl_configs
    from helpers_tiny import write_tiny_tokenizer

    from cpuflow.tokenizer import ClipTokenizer
    from export import sources_sdxl
    from export.components import component_specs
    from export.sources import load_source
    tiny = tiny_sdxl_configs()
    tiny["model_index"] = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    monkeypatch.setattr(sources_sdxl, "load_vendored", lambda: tiny)
    tok = write_tiny_tokenizer(tmp_path / "tok", "sd1")
    m = load_source(None, random_weights=True, arch="sdxl", tokenizer=tok, seed=1)
    assert m.family == "sdxl" and m.random_weights and m.default_size == SIZE
    assert type(m.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    t1, t2 = ClipTokenizer.from_dir(m.tokenizer_dir), ClipTokenizer.from_dir(m.tokenizer_2_dir)
    assert t2.pad_id == t1.token_id("!") and t1.pad_id == t1.eos_id
    assert list(component_specs(m, 77)) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]


def test_calibration_samples_what_a_generation_feeds_the_unet(sdxl):
    """export/calibrate.py samples through the runtime's own Run (txt2img's step loop):
    its UNet feeds are those of a txt2img of the same prompt, seed, steps and guidance,
    SDXL's pooled text_embeds and time ids included (the empty negative: zeros)."""
    from cpuflow.config import GenerationRequest, LoadConfig
    from cpuflow.pipelines.generate import generate
    from export.calibrate import _capturing_model, capture
    _, out, _ = sdxl
    cal = capture(out, [PROMPT], steps=2, backend="onnxruntime", precision="f32", seed=4)
    held = cal.held_out
    assert len(cal) == 2 and cal.info["batch"] == 2 and len(held) >= 2
    model = _capturing_model(LoadConfig(model=out, backend="onnxruntime", precision="f32", use_cache=False))
    try:
        generate(model, GenerationRequest(prompt=PROMPT, steps=2, guidance=cal.info["guidance"], seed=4,
                                         watermark=False))  # the model's default guidance
    finally:
        model.close()
    assert len(model.captured) == len(cal)
    for got, want in zip(cal.samples, model.captured):
        assert sorted(got) == ["encoder_hidden_states", "sample", "text_embeds", "time_ids", "timestep"]
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    s = cal.samples[0]
    assert s["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2
    assert not s["text_embeds"][0].any() and s["text_embeds"][1].any()     # [uncond (zeros), cond]


# One format a run: the export of every component, the calibration and both quantizations
# take about 30 s on a quiet 2-core machine; the OpenVINO one (NNCF) is slower: slow tier.
@pytest.mark.parametrize("fmt", ["onnx", pytest.param("openvino", marks=pytest.mark.slow)])
def test_calibrated_int8_and_hybrid_export_and_run(sdxl, tmp_path, fmt):
    """--quantize int8 / hybrid on SDXL (once refused): calibrated on the SDXL UNet's real
    inputs (2 prompts x 1 step: 2 samples), gated on a held-out run, and the runtime
    generates with each variant."""
    from cpuflow.manifest import load_manifest
    from export.build import export_model
    from export.sources import load_source
    src, _, _ = sdxl
    out = export_model(load_source(str(src)), tmp_path / "q", formats=(fmt,), quantize=("int8", "hybrid"),
                       calibration_size=2, calibration_steps=1, progress=lambda *a, **k: None)
    m = load_manifest(out, verify="sha256")
    assert m.validated
    unet = m.components["unet"]
    backend = {"onnx": "onnxruntime", "openvino": "openvino"}[fmt]
    for mode in ("int8", "hybrid"):
        par, cal = unet.variants[mode].parity[fmt], unet.variants[mode].quantization[fmt]["calibration"]
        assert par["passed"] and par["gate"] == "held_out" and par["held_out"]["points"] == 1, mode
        assert cal["prompts"] == 2 and cal["steps"] == 1 and cal["samples"] == 2, mode
        assert par["inputs"]["text_embeds"] and par["inputs"]["time_ids"]
        with Pipeline.load(out, backend=backend, variant=mode, precision="f32", threads=1, use_cache=False) as cf:
            res = cf.txt2img(PROMPT, watermark=False, steps=2, seed=3)
        assert res.records[0]["variant"]["unet"] == mode
        img = np.asarray(res.images[0], dtype=np.float32)
        assert img.shape == (SIZE, SIZE, 3) and np.isfinite(img).all()


def test_img2img_aesthetic_score_time_ids_match_diffusers(tmp_path_factory, backend="onnxruntime"):
    """A model whose config requires_aesthetics_score (5 time ids: sizes, crop, aesthetic
    score 6.0 / negative 2.5), no force_zeros: StableDiffusionXLImg2ImgPipeline's time ids.
    The time ids are built by the runtime, the same for both backends (the other SDXL tests
    run both), so this model is exported to ONNX only: one tiny SDXL export less per suite."""
    from PIL import Image

    from export.build import export_model
    from export.sources import load_source
    global _AESTHETIC
    if _AESTHETIC is None:
        base = tmp_path_factory.mktemp("tiny-sdxl-aesthetic")
        src = save_tiny_sdxl_folder(base / "src", seed=1, force_zeros_for_empty_prompt=False,
                                    requires_aesthetics_score=True)
        out = export_model(load_source(str(src)), base / "model", formats=("onnx",),
                           progress=lambda *a, **k: None)
        _AESTHETIC = (src, out)
    src, out = _AESTHETIC
    m = json.loads((out / "cpuflow.json").read_text())
    assert m["sdxl"]["requires_aesthetics_score"] is True
    assert {s["name"]: s["shape"] for s in m["components"]["unet"]["inputs"]}["time_ids"] == ["batch", 5]
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.requires_aesthetics_score
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = pipe(prompt=PROMPT, image=init, strength=0.7, num_inference_steps=STEPS, guidance_scale=5.0,
               generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ref = np.round(np.clip(ref, 0, 1) * 255).astype(np.uint8)
    res = _cpuflow(out, backend).img2img(PROMPT, init, watermark=False, strength=0.7, steps=STEPS, sampler="euler", guidance=5.0,
                                         seed=3)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"aesthetic img2img {backend}: {p:.1f} dB"


_AESTHETIC = None


def test_low_memory_mode_gives_the_same_image(sdxl):
    """--low-memory: both text encoders leave memory before the UNet comes in; same image."""
    _, out, _ = sdxl
    kw = dict(negative_prompt="blurry", steps=2, sampler="euler", guidance=5.0, seed=5)
    a = _cpuflow(out, "onnxruntime").txt2img(PROMPT, **kw)
    with Pipeline.load(out, backend="onnxruntime", precision="f32", threads=1, use_cache=False,
                       low_memory=True) as cf:
        b = cf.txt2img(PROMPT, **kw)
        left = {name for name, _, _ in cf.model.loaded_sessions()}
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not left & {"text_encoder", "text_encoder_2", "unet"}


def test_server_serves_an_sdxl_model(sdxl):
    """`cpuflow serve --model SDXL_DIR`: a job over the JSON API gives the API's image."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import io
    import time

    from fastapi.testclient import TestClient
    from PIL import Image

    from cpuflow.config import GenerationRequest
    from cpuflow.server.app import create_app
    _, out, _ = sdxl
    pipe = _cpuflow(out, "onnxruntime")
    c = TestClient(create_app({"xl": pipe}), base_url="http://127.0.0.1:7860")
    r = c.post("/api/generate", json={"prompt": PROMPT, "steps": 2, "seed": 4, "sampler": "euler"})
    assert r.status_code == 202, r.text
    t0 = time.time()
    while (job := c.get(f"/api/jobs/{r.json()['id']}").json())["status"] not in ("done", "failed", "cancelled"):
        assert time.time() - t0 < 120, job
        time.sleep(0.05)
    assert job["status"] == "done", job
    png = Image.open(io.BytesIO(c.get(job["images"][0]["url"]).content)).convert("RGB")
    direct = pipe(GenerationRequest(prompt=PROMPT, steps=2, seed=4, sampler="euler")).images[0]
    assert np.array_equal(np.asarray(png), np.asarray(direct))


def test_export_cli_arch_sdxl(tmp_path, monkeypatch):
    """`cpuflow export --random-weights --arch sdxl` is accepted; without a tokenizer (offline,
    none cached) it stops with one clear line before building anything."""
    from click.testing import CliRunner

    from export import sources
    from export.cli import export_command
    monkeypatch.setattr(sources, "_cached_tokenizer", lambda family: None)   # never build the full size here
    r = CliRunner().invoke(export_command, ["--help"])
    assert r.exit_code == 0 and "--arch sdxl" in r.output
    r = CliRunner().invoke(export_command, ["--random-weights", "--arch", "sdxl", str(tmp_path / "m")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "no CLIP tokenizer" in r.output and "--tokenizer" in r.output
    assert not (tmp_path / "m").exists()
