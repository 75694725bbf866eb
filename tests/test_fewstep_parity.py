"""Few-step models against diffusers, on tiny random weights (issue #7).

* LCM: a UNet with a guidance embedding (``time_cond_proj_dim``) + LCMScheduler.
  diffusers runs it without an unconditional branch and feeds
  ``get_guidance_scale_embedding(guidance - 1)``; cpuflow's export gives the
  UNet a ``timestep_cond`` input and the runtime computes the embedding.
  Also img2img (StableDiffusionImg2ImgPipeline + LCMScheduler) and LCM-SDXL
  (StableDiffusionXL(Img2Img)Pipeline + LCMScheduler, a guidance-embedding SDXL UNet).
* Turbo: an SD 2.x model with SD-Turbo's scheduler (trailing spacing),
  1-4 steps, guidance 0, euler_a and euler.
* LoRA: a tiny LoRA (diffusers and kohya formats) merged at export
  (``--lora FILE:SCALE``) against diffusers' load_lora_weights + fuse_lora.

Images: float32, both backends, >= 50 dB PSNR (see test_parity.py for why 50).
Random weights: plumbing and numerics, not image quality.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from helpers_fewstep import (TIME_COND_PROJ_DIM, save_tiny_lcm_folder, save_tiny_lora,  # noqa: E402
                             save_tiny_turbo_folder)
from helpers_images import psnr  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.guidance_embedding import guidance_embedding  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
PROMPT = "a red circle"
BACKENDS = ("openvino", "onnxruntime")


def _quiet(*_a, **_k):
    return None


def _diffusers_pipe(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, *, steps, guidance, seed=7, scheduler=None, negative=None):
    base = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    try:
        img = pipe(prompt=PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="pil").images[0]
    finally:
        pipe.scheduler = base
    return np.asarray(img)


_PIPES: dict = {}


def _cpuflow(model, backend):
    key = (str(model), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(model, backend=backend, precision="f32", threads=1, use_cache=False)
    return _PIPES[key]


@pytest.fixture(scope="module", autouse=True)
def _close_pipes():
    yield
    for p in _PIPES.values():
        p.close()
    _PIPES.clear()


def _export(src, out, formats=("onnx", "openvino")):
    from export.build import export_model
    from export.sources import load_source
    return export_model(load_source(str(src)), out, formats=formats, progress=_quiet)


# --- the guidance embedding -----------------------------------------------------------------
@pytest.mark.parametrize("dim,atol", [(32, 1e-6), (33, 1e-6), (256, 2e-3)])
def test_guidance_embedding_equals_diffusers(dim, atol):
    """Equal for small dims; at 256 (real LCMs) torch's float32 exp is 1 ulp off on
    some frequencies, which sin(w f) with w up to 1e4 turns into ~1e-3."""
    pipe_cls = diffusers.StableDiffusionPipeline
    for g in (0.0, 1.0, 1.5, 4.0, 8.0, 13.7):
        ref = pipe_cls.get_guidance_scale_embedding(None, torch.tensor(g - 1).repeat(2), embedding_dim=dim)
        got = guidance_embedding(g, dim, batch=2)
        assert got.dtype == np.float32 and got.shape == (2, dim)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=atol)


# --- LCM ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-lcm")
    src = save_tiny_lcm_folder(base / "src")
    model = _export(src, base / "model")
    return src, model, _diffusers_pipe(src), {}


def test_lcm_export_has_the_guidance_input(lcm):
    _, model, _, _ = lcm
    m = json.loads((model / "cpuflow.json").read_text())
    unet = m["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet["inputs"][3] == {"name": "timestep_cond", "dtype": "float32", "shape": ["batch", TIME_COND_PROJ_DIM]}
    assert unet["config"]["time_cond_proj_dim"] == TIME_COND_PROJ_DIM
    assert m["scheduler"]["_class_name"] == "LCMScheduler"
    assert m["defaults"] == {"steps": 4, "guidance": 8.5}     # export/fewstep_defaults.py
    for fmt in ("onnx", "openvino"):
        assert unet["variants"]["fp32"]["parity"][fmt]["passed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [1.5, 8.0])
def test_lcm_matches_diffusers(lcm, backend, steps, guidance):
    _, model, pipe, refs = lcm
    if (steps, guidance) not in refs:
        refs[(steps, guidance)] = _reference(pipe, steps=steps, guidance=guidance)
    cf = _cpuflow(model, backend)
    # no sampler given: the model's LCMScheduler makes lcm the default
    res = cf.txt2img(PROMPT, watermark=False, steps=steps, guidance=guidance, width=SIZE, height=SIZE, seed=7)
    assert res.records[0]["sampler"] == "lcm"
    p = psnr(res.images[0], refs[(steps, guidance)])
    assert p >= PSNR_MIN, f"lcm {steps} steps guidance {guidance} {backend}: {p:.1f} dB"
    # guidance goes in as the embedding: one UNet call per step at batch 1, no negative branch
    assert all(d["batch"] == 1 for name, d, _ in cf.model.loaded_sessions() if name == "unet")


def test_lcm_guidance_changes_the_image_and_matches_the_lcm_pipeline(lcm):
    """diffusers' own LatentConsistencyModelPipeline gives the same image; the
    guidance really reaches the UNet (another guidance, another image)."""
    src, model, pipe, _ = lcm
    lcm_pipe = diffusers.LatentConsistencyModelPipeline(**{k: v for k, v in pipe.components.items()
                                                            if k != "image_encoder"},
                                                         requires_safety_checker=False)
    lcm_pipe.set_progress_bar_config(disable=True)
    ref = np.asarray(lcm_pipe(prompt=PROMPT, num_inference_steps=4, guidance_scale=8.0, height=SIZE, width=SIZE,
                              generator=torch.Generator("cpu").manual_seed(7), output_type="pil").images[0])
    cf = _cpuflow(model, "onnxruntime")
    a = cf.txt2img(PROMPT, watermark=False, steps=4, guidance=8.0, width=SIZE, height=SIZE, seed=7)
    b = cf.txt2img(PROMPT, steps=4, guidance=2.0, width=SIZE, height=SIZE, seed=7)
    assert psnr(a.images[0], ref) >= PSNR_MIN
    assert psnr(a.images[0], b.images[0]) < PSNR_MIN   # tiny random UNet: a small but real change
    c = cf.txt2img(PROMPT, width=SIZE, height=SIZE, seed=7)   # the manifest's defaults: 4 steps, guidance 8.5
    assert (c.records[0]["steps"], c.records[0]["guidance"], c.records[0]["sampler"]) == (4, 8.5, "lcm")


def _init_image():
    from PIL import Image
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_lcm_img2img_matches_diffusers(lcm, backend, strength):
    """StableDiffusionImg2ImgPipeline with the model's LCMScheduler: the full
    4-step LCM schedule, the last int(4 * strength) steps run (set_begin_index),
    noise re-injected between them, none after the last; guidance as the embedding."""
    _, model, pipe, refs = lcm
    key = ("img2img", strength)
    if key not in refs:
        i2i = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        i2i.set_progress_bar_config(disable=True)
        assert isinstance(i2i.scheduler, diffusers.LCMScheduler)
        refs[key] = np.asarray(i2i(prompt=PROMPT, image=_init_image(), strength=strength, num_inference_steps=4,
                                   guidance_scale=8.0, generator=torch.Generator("cpu").manual_seed(7),
                                   output_type="pil").images[0])
    cf = _cpuflow(model, backend)
    res = cf.img2img(PROMPT, _init_image(), watermark=False, strength=strength, steps=4, guidance=8.0, seed=7)
    assert res.records[0]["sampler"] == "lcm" and res.records[0]["task"] == "img2img"
    p = psnr(res.images[0], refs[key])
    assert p >= PSNR_MIN, f"lcm img2img strength {strength} {backend}: {p:.1f} dB"
    assert all(d["batch"] == 1 for name, d, _ in cf.model.loaded_sessions() if name == "unet")


# --- Turbo -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-turbo")
    src = save_tiny_turbo_folder(base / "src")
    model = _export(src, base / "model")
    return src, model, _diffusers_pipe(src)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("sampler", ["euler_a", "euler"])
def test_turbo_matches_diffusers(turbo, backend, steps, sampler):
    _, model, pipe = turbo
    sched = None
    if sampler == "euler":
        sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = _reference(pipe, steps=steps, guidance=0.0, scheduler=sched)
    cf = _cpuflow(model, backend)
    res = cf.txt2img(PROMPT, watermark=False, steps=steps, guidance=0.0, sampler=None if sampler == "euler_a" else sampler,
                     width=SIZE, height=SIZE, seed=7)
    assert res.records[0]["sampler"] == sampler       # euler_a: the model's own scheduler
    p = psnr(res.images[0], ref)
    assert p >= PSNR_MIN, f"turbo {sampler} {steps} steps {backend}: {p:.1f} dB"
    assert all(d["batch"] == 1 for name, d, _ in cf.model.loaded_sessions() if name == "unet")


# --- LoRA ---------------------------------------------------------------------------------------------
LORA_SCALE = 0.7


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_export):
    """The session's tiny sd1 export, its LoRA files, and the LoRA'd exports:
    the diffusers-format one through the CLI (both formats), the kohya one
    through the Python API (onnx only)."""
    from export.build import export_model
    from export.cli import export_command
    from export.lora import merge_loras
    from export.sources import load_source

    plain = tiny_export("sd1")
    base = tmp_path_factory.mktemp("tiny-lora")
    files = {fmt: save_tiny_lora(base / f"lora-{fmt}.safetensors", "sd1", fmt) for fmt in ("diffusers", "kohya")}
    out = base / "model-diffusers"
    res = CliRunner().invoke(export_command, [str(plain.src), str(out), "--lora", f"{files['diffusers']}:{LORA_SCALE}"])
    assert res.exit_code == 0, res.output
    loaded = load_source(str(plain.src))
    merge_loras(loaded, [f"{files['kohya']}:{LORA_SCALE}"])
    kohya_out = export_model(loaded, base / "model-kohya", formats=("onnx",), progress=_quiet)
    return plain, files, {"diffusers": out, "kohya": kohya_out}, {}


def _lora_reference(plain_src, lora_file, refs):
    if lora_file not in refs:
        pipe = _diffusers_pipe(plain_src)
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora(lora_scale=LORA_SCALE)
        pipe.unload_lora_weights()
        refs[lora_file] = _reference(pipe, steps=4, guidance=7.5,
                                     scheduler=diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    return refs[lora_file]


@pytest.mark.parametrize("fmt,backend", [("diffusers", "openvino"), ("diffusers", "onnxruntime"),
                                         ("kohya", "onnxruntime")])
def test_lora_export_matches_diffusers_fused_lora(lora, fmt, backend):
    plain, files, models, refs = lora
    ref = _lora_reference(plain.src, files[fmt], refs)
    res = _cpuflow(models[fmt], backend).txt2img(PROMPT, watermark=False, steps=4, sampler="euler", guidance=7.5,
                                                 width=SIZE, height=SIZE, seed=7)
    p = psnr(res.images[0], ref)
    assert p >= PSNR_MIN, f"LoRA ({fmt}) {backend}: {p:.1f} dB"
    # ... and the LoRA changed the model: the plain export's image is another one
    base = _cpuflow(plain.model, backend).txt2img(PROMPT, steps=4, sampler="euler", guidance=7.5,
                                                  width=SIZE, height=SIZE, seed=7)
    assert psnr(base.images[0], res.images[0]) < 45


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_lcm_lora_style_sampling_matches_diffusers(lora, guidance):
    """The LCM-LoRA recipe: a LoRA merged into a plain model, then the lcm sampler
    at low guidance (diffusers: LCMScheduler.from_config(pipe.scheduler.config))."""
    plain, files, models, refs = lora
    key = ("lcm", guidance)
    if key not in refs:
        pipe = _diffusers_pipe(plain.src)
        pipe.load_lora_weights(str(files["diffusers"]))
        pipe.fuse_lora(lora_scale=LORA_SCALE)
        pipe.unload_lora_weights()
        refs[key] = _reference(pipe, steps=4, guidance=guidance,
                               scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config))
    res = _cpuflow(models["diffusers"], "openvino").txt2img(PROMPT, watermark=False, steps=4, sampler="lcm", guidance=guidance,
                                                           width=SIZE, height=SIZE, seed=7)
    p = psnr(res.images[0], refs[key])
    assert p >= PSNR_MIN, f"LCM-LoRA style, guidance {guidance}: {p:.1f} dB"


def test_lora_is_recorded_and_changes_the_weights(lora):
    plain, files, models, _ = lora
    from export.lora import sha256_file
    m = json.loads((models["diffusers"] / "cpuflow.json").read_text())
    assert m["source"]["loras"] == [{"file": files["diffusers"].name, "sha256": sha256_file(files["diffusers"]),
                                     "scale": LORA_SCALE}]
    p = json.loads((plain.model / "cpuflow.json").read_text())
    assert "loras" not in p["source"] and "defaults" not in p
    for comp in ("unet", "text_encoder"):
        f = m["components"][comp]["variants"]["fp32"]["files"]["onnx"][-1]
        assert m["files"][f]["sha256"] != p["files"][f]["sha256"], comp
    vae = m["components"]["vae_decoder"]["variants"]["fp32"]["files"]["onnx"][-1]
    assert m["files"][vae]["sha256"] == p["files"][vae]["sha256"]


def test_lora_scale_parsing():
    from export.lora import parse_lora_arg
    from cpuflow.errors import InvalidArgument
    assert parse_lora_arg("a.safetensors").scale == 1.0
    r = parse_lora_arg("dir:x/a.safetensors:0.5")
    assert (str(r.path), r.scale) == ("dir:x/a.safetensors", 0.5)
    assert parse_lora_arg("a.safetensors:-1").scale == -1.0
    with pytest.raises(InvalidArgument, match="finite"):
        parse_lora_arg("a.safetensors:nan")


def _bad_lora_cases(tmp_path, plain_src, sd2_lora):
    text = tmp_path / "notes.safetensors"
    text.write_text("{not weights}\n")
    pickle = tmp_path / "lora.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickle)
    return [
        (tmp_path / "missing.safetensors", "does not exist"),
        (text, "JSON/text file"),
        (pickle, "pickle, not safetensors"),
        (plain_src / "unet" / "diffusion_pytorch_model.safetensors", "is not a LoRA file"),
        (tmp_path, "is a folder"),
        (sd2_lora, "does not fit this model"),
    ]


def test_bad_lora_files_fail_clearly_and_write_nothing(lora, tmp_path):
    from export.cli import export_command
    plain, _, _, _ = lora
    sd2_lora = save_tiny_lora(tmp_path / "sd2-lora.safetensors", "sd2", "diffusers")
    for bad, message in _bad_lora_cases(tmp_path, plain.src, sd2_lora):
        out = tmp_path / "out"
        res = CliRunner().invoke(export_command, [str(plain.src), str(out), "--format", "onnx", "--lora", str(bad)])
        assert res.exit_code == 8, (bad, res.output)
        assert message in res.output, (bad, res.output)
        assert "Traceback" not in res.output
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging left behind"


# --- LCM-SDXL -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lcm_sdxl(tmp_path_factory):
    from helpers_fewstep import save_tiny_lcm_sdxl_folder
    base = tmp_path_factory.mktemp("tiny-lcm-sdxl")
    src = save_tiny_lcm_sdxl_folder(base / "src")
    model = _export(src, base / "model")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return src, model, pipe, {}


def test_lcm_sdxl_export_has_the_guidance_input(lcm_sdxl):
    _, model, pipe, _ = lcm_sdxl
    assert isinstance(pipe.scheduler, diffusers.LCMScheduler)
    m = json.loads((model / "cpuflow.json").read_text())
    unet = m["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond",
                                                   "text_embeds", "time_ids"]
    assert unet["config"]["time_cond_proj_dim"] == TIME_COND_PROJ_DIM
    assert m["family"] == "sdxl" and m["scheduler"]["_class_name"] == "LCMScheduler"
    assert m["defaults"] == {"steps": 4, "guidance": 8.5}     # export/fewstep_defaults.py, as SD 1.5 LCM
    for fmt in ("onnx", "openvino"):
        assert unet["variants"]["fp32"]["parity"][fmt]["passed"]


def _sdxl_reference(pipe, *, steps, guidance, init=None, strength=0.6, seed=7):
    kw = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if init is None:
        img = pipe(height=SIZE, width=SIZE, **kw).images[0]
    else:
        i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, add_watermarker=False)
        i2i.set_progress_bar_config(disable=True)
        img = i2i(image=init, strength=strength, **kw).images[0]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("backend,steps,guidance", [("openvino", 4, 8.0), ("onnxruntime", 4, 8.0),
                                                    ("onnxruntime", 2, 1.5)])
def test_lcm_sdxl_matches_diffusers(lcm_sdxl, backend, steps, guidance):
    """StableDiffusionXLPipeline with the model's LCMScheduler: guidance as the
    embedding (no negative branch, batch 1), text_embeds / time_ids as for SDXL."""
    _, model, pipe, refs = lcm_sdxl
    if (steps, guidance) not in refs:
        refs[(steps, guidance)] = _sdxl_reference(pipe, steps=steps, guidance=guidance)
    cf = _cpuflow(model, backend)
    res = cf.txt2img(PROMPT, watermark=False, steps=steps, guidance=guidance, width=SIZE, height=SIZE, seed=7)
    assert res.records[0]["sampler"] == "lcm"
    p = psnr(res.images[0], refs[(steps, guidance)])
    assert p >= PSNR_MIN, f"lcm-sdxl {steps} steps guidance {guidance} {backend}: {p:.1f} dB"
    assert all(d["batch"] == 1 for name, d, _ in cf.model.loaded_sessions() if name == "unet")


def test_lcm_sdxl_defaults_and_img2img(lcm_sdxl):
    """No --steps / --guidance: the manifest's 4 steps at 8.5; img2img with
    StableDiffusionXLImg2ImgPipeline + LCMScheduler semantics."""
    _, model, pipe, refs = lcm_sdxl
    cf = _cpuflow(model, "openvino")
    res = cf.txt2img(PROMPT, watermark=False, width=SIZE, height=SIZE, seed=7)
    assert (res.records[0]["steps"], res.records[0]["guidance"]) == (4, 8.5)
    assert psnr(res.images[0], _sdxl_reference(pipe, steps=4, guidance=8.5)) >= PSNR_MIN
    ref = _sdxl_reference(pipe, steps=4, guidance=8.0, init=_init_image(), strength=0.6)
    res = cf.img2img(PROMPT, _init_image(), watermark=False, strength=0.6, steps=4, guidance=8.0, seed=7)
    p = psnr(res.images[0], ref)
    assert p >= PSNR_MIN, f"lcm-sdxl img2img: {p:.1f} dB"
