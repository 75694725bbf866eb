"""Inpainting: parity with diffusers' StableDiffusionInpaintPipeline (a tiny random
9-channel inpainting UNet and a tiny random ordinary 4-channel one) and
StableDiffusionXLInpaintPipeline (the tiny SDXL), f32, both backends, two strengths,
the same seed; "only masked" against diffusers' padding_mask_crop; the bad inputs
the issue lists. Random weights: these prove plumbing and numerics, not images.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_images import psnr  # noqa: E402
from helpers_inpaint import test_images  # noqa: E402
from PIL import Image  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.errors import InvalidArgument, ModelError  # noqa: E402

PSNR_MIN = 50.0
STEPS = 6
PROMPT = "a red circle"
REFERENCE = {
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
BACKENDS = ["openvino", "onnxruntime"]
_PIPES: dict = {}


def _cpuflow(out, backend):
    key = (str(out), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(out, backend=backend, precision="f32", threads=2, use_cache=False)
    return _PIPES[key]


def _reference(pipe, sampler, **kw):
    cls_name, overrides = REFERENCE[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    kw.setdefault("guidance_scale", 7.5)
    img = pipe(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(7),
               output_type="np", **kw).images[0]
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def nine(tiny_inpaint_export):
    t = tiny_inpaint_export("sd1")
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(t.src, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return t.model, pipe


@pytest.fixture(scope="module")
def four(tiny_export):
    t = tiny_export("sd1")
    base = diffusers.StableDiffusionPipeline.from_pretrained(t.src, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return t.model, pipe


# --- export --------------------------------------------------------------------------------------
def test_export_records_the_inpainting_unet(nine, four):
    m9 = json.loads((nine[0] / "cpuflow.json").read_text())
    assert m9["unet_kind"] == "inpaint"
    assert m9["components"]["unet"]["inputs"][0]["shape"][1] == 9
    assert m9["components"]["unet"]["outputs"][0]["shape"][1] == 4
    assert "vae_encoder" in m9["components"]
    assert json.loads((four[0] / "cpuflow.json").read_text())["unet_kind"] == "txt2img"


def test_single_file_with_nine_channels_is_detected(tmp_path):
    from export import checkpoint_keys as ck
    from export.detect import detect_checkpoint
    from helpers_tiny import tiny_original_state_dict

    sd = tiny_original_state_dict("sd1")
    w = sd[ck.UNET_PREFIX + "input_blocks.0.0.weight"]
    sd[ck.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1)   # 9 input channels
    info = detect_checkpoint(sd, filename="tiny-inpainting.safetensors")
    assert info.unet_config["in_channels"] == 9
    assert any("inpainting UNet" in n for n in info.notes)
    sd[ck.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.cat([w, w[:, :3]], dim=1)     # 7: an upscaler
    from cpuflow.errors import SourceError
    with pytest.raises(SourceError, match="7 input channels"):
        detect_checkpoint(sd, filename="x.safetensors")


# --- parity ----------------------------------------------------------------------------------------
CASES = [("plms", 1.0), ("euler_a", 0.6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler,strength", CASES)
def test_nine_channel_unet_matches_diffusers(nine, backend, sampler, strength):
    out, pipe = nine
    init, mask = test_images(64)
    ref = _reference(pipe, sampler, image=init, mask_image=mask, strength=strength, height=64, width=64)
    res = _cpuflow(out, backend).inpaint(PROMPT, init, mask, strength=strength, steps=STEPS, sampler=sampler,
                                         guidance=7.5, seed=7)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"9-channel {sampler} strength {strength} {backend}: {p:.1f} dB"
    assert res.records[0]["task"] == "inpaint" and res.records[0]["strength"] == strength


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler,strength", CASES + [("dpmpp_2m", 0.6)])
def test_four_channel_unet_matches_diffusers(four, backend, sampler, strength):
    out, pipe = four
    init, mask = test_images(64, seed=1)
    ref = _reference(pipe, sampler, image=init, mask_image=mask, strength=strength, height=64, width=64)
    res = _cpuflow(out, backend).inpaint(PROMPT, init, mask, strength=strength, steps=STEPS, sampler=sampler,
                                         guidance=7.5, seed=7)
    got = np.asarray(res.images[0])
    p = psnr(got, ref)
    assert p >= PSNR_MIN, f"4-channel {sampler} strength {strength} {backend}: {p:.1f} dB"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sdxl_inpaint_matches_diffusers(tiny_sdxl_export, backend, strength):
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_export.src, add_watermarker=False)
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**base.components, add_watermarker=False)
    pipe.register_to_config(force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    init, mask = test_images(64, seed=2)
    ref = _reference(pipe, "euler", image=init, mask_image=mask, strength=strength, height=64, width=64,
                     guidance_scale=5.0)
    res = _cpuflow(tiny_sdxl_export.model, backend).inpaint(PROMPT, init, mask, strength=strength, steps=STEPS,
                                                            sampler="euler", guidance=5.0, seed=7)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"SDXL inpaint strength {strength} {backend}: {p:.1f} dB"


@pytest.mark.slow
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sdxl_nine_channel_unet_matches_diffusers(tiny_inpaint_export, strength):
    """The SDXL inpainting layout (a 9-channel SDXL UNet), opt-in (--runslow): one more tiny export."""
    t = tiny_inpaint_export("sdxl")
    pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(t.src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    init, mask = test_images(64, seed=7)
    ref = _reference(pipe, "euler", image=init, mask_image=mask, strength=strength, height=64, width=64,
                     guidance_scale=5.0)
    for backend in BACKENDS:
        res = _cpuflow(t.model, backend).inpaint(PROMPT, init, mask, strength=strength, steps=STEPS,
                                                 sampler="euler", guidance=5.0, seed=7)
        p = psnr(np.asarray(res.images[0]), ref)
        assert p >= PSNR_MIN, f"SDXL 9-channel strength {strength} {backend}: {p:.1f} dB"


def test_only_masked_matches_diffusers_padding_mask_crop(nine):
    """--inpaint-area masked --padding 8 --mask-blur 2 on a 128x96 picture, worked at 64x64:
    diffusers' padding_mask_crop=8 with the mask blurred by VaeImageProcessor.blur(mask, 2)."""
    out, pipe = nine
    init, mask = test_images(128, seed=3, height=96)
    blurred = pipe.mask_processor.blur(mask, blur_factor=2)
    cls_name, overrides = REFERENCE["euler_a"]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    ref = pipe(prompt=PROMPT, image=init, mask_image=blurred, strength=0.75, height=64, width=64,
               padding_mask_crop=8, num_inference_steps=STEPS, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(7)).images[0]
    res = _cpuflow(out, "onnxruntime").inpaint(PROMPT, init, mask, strength=0.75, steps=STEPS, sampler="euler_a",
                                               guidance=7.5, seed=7, mask_blur=2, inpaint_area="masked",
                                               padding=8, width=64, height=64)
    got = res.images[0]
    assert got.size == (128, 96) == ref.size
    p = psnr(np.asarray(got), np.asarray(ref))
    assert p >= PSNR_MIN, f"only masked: {p:.1f} dB"
    # outside the (grown) region the picture is the original's, pixel for pixel
    x1, y1, x2, y2 = res.records[0]["inpaint_box"]
    a, o = np.asarray(got), np.asarray(init)
    assert np.array_equal(a[:, :x1], o[:, :x1]) and np.array_equal(a[:, x2:], o[:, x2:])


def test_inpainting_model_for_txt2img_repaints_everything(nine):
    """Decided: a plain txt2img request to an inpainting model works as diffusers' inpainting
    pipeline does with an all-white mask (the picture then only enters as zeros)."""
    out, pipe = nine
    init = Image.new("RGB", (64, 64), (12, 200, 99))
    white = Image.new("L", (64, 64), 255)
    ref = _reference(pipe, "plms", image=init, mask_image=white, strength=1.0, height=64, width=64)
    res = _cpuflow(out, "onnxruntime").txt2img(PROMPT, steps=STEPS, sampler="plms", guidance=7.5, seed=7,
                                               width=64, height=64)
    assert psnr(np.asarray(res.images[0]), ref) >= PSNR_MIN
    assert res.records[0]["task"] == "txt2img"


# --- bad input -------------------------------------------------------------------------------------
def test_mask_of_another_size_is_resized_and_said_once(four):
    out, _ = four
    init, mask = test_images(64, seed=4)
    big = mask.resize((128, 128), Image.Resampling.NEAREST)
    cf = _cpuflow(out, "onnxruntime")
    res = cf.inpaint(PROMPT, init, big, steps=2, sampler="euler", seed=1, n_samples=2)
    notes = [w for w in res.warnings if "resized" in w]
    assert len(notes) == 1 and "128x128" in notes[0] and "64x64" in notes[0]
    same = cf.inpaint(PROMPT, init, mask, steps=2, sampler="euler", seed=1)
    assert psnr(np.asarray(same.images[0]), np.asarray(res.images[0])) > 40


def test_empty_mask_and_mask_without_image_are_clear_errors(four):
    out, _ = four
    init, _ = test_images(64)
    cf = _cpuflow(out, "onnxruntime")
    with pytest.raises(InvalidArgument, match="mask is empty"):
        cf.inpaint(PROMPT, init, Image.new("L", (64, 64), 0), steps=2)
    with pytest.raises(InvalidArgument, match="mask is empty"):
        cf.inpaint(PROMPT, init, Image.new("L", (64, 64), 0), steps=2, inpaint_area="masked")
    with pytest.raises(InvalidArgument, match="needs an init image"):
        cf(__import__("cpuflow.config", fromlist=["x"]).GenerationRequest(prompt="x", mask=Image.new("L", (8, 8))))
    with pytest.raises(InvalidArgument, match="mask_blur"):
        cf.inpaint(PROMPT, init, init, mask_blur=-1)
    with pytest.raises(InvalidArgument, match="inpaint_area"):
        cf.inpaint(PROMPT, init, init, inpaint_area="some")


def test_folder_without_vae_encoder_is_refused_before_work(four, tmp_path):
    src = four[0]
    dst = tmp_path / "no-encoder"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("vae_encoder"))
    m = json.loads((dst / "cpuflow.json").read_text())
    del m["components"]["vae_encoder"]
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("vae_encoder/")}
    (dst / "cpuflow.json").write_text(json.dumps(m))
    init, mask = test_images(64)
    init.save(tmp_path / "i.png")
    mask.save(tmp_path / "m.png")
    from click.testing import CliRunner

    from cpuflow.cli import main
    out_png = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(dst), PROMPT, "--init-image", str(tmp_path / "i.png"),
                                  "--mask", str(tmp_path / "m.png"), "--backend", "onnxruntime", "--steps", "2",
                                  "--out", str(out_png), "-q"])
    assert r.exit_code != 0 and "vae_encoder" in r.output and "Traceback" not in r.output
    assert not out_png.exists()
    with Pipeline.load(dst, backend="onnxruntime") as cf, pytest.raises(ModelError, match="vae_encoder"):
        cf.inpaint(PROMPT, init, mask, steps=2)


def test_cli_inpaint_writes_the_image_with_its_record(four, tmp_path):
    from click.testing import CliRunner

    from cpuflow.cli import main
    from cpuflow.image import read_png_metadata
    init, mask = test_images(64, seed=5)
    init.save(tmp_path / "i.png")
    mask.convert("RGBA").save(tmp_path / "m.png")     # any mode
    out_png = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(four[0]), PROMPT, "--init-image",
                                  str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"), "--mask-blur", "1",
                                  "--backend", "onnxruntime", "--steps", "2", "--seed", "3", "--out", str(out_png),
                                  "-q"])
    assert r.exit_code == 0, r.output
    rec = read_png_metadata(out_png)
    flat = json.dumps(rec)
    assert "inpaint" in flat and '"mask_blur": 1' in flat
    empty = tmp_path / "empty.png"
    Image.new("L", (64, 64), 0).save(empty)
    out2 = tmp_path / "o2.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(four[0]), PROMPT, "--init-image",
                                  str(tmp_path / "i.png"), "--mask", str(empty), "--backend", "onnxruntime",
                                  "--out", str(out2), "-q"])
    assert r.exit_code != 0 and "mask is empty" in r.output and not out2.exists()


def test_http_api_takes_the_mask_as_png_in_the_json(four):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import base64
    import io

    from fastapi.testclient import TestClient

    from cpuflow.server.app import create_app

    def b64(img):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()

    init, mask = test_images(64, seed=6)
    cf = _cpuflow(four[0], "onnxruntime")
    c = TestClient(create_app({"tiny": cf}), base_url="http://127.0.0.1:7860")
    body = {"prompt": PROMPT, "init_image": b64(init), "mask": "data:image/png;base64," + b64(mask), "steps": 2,
            "sampler": "euler", "seed": 5, "mask_blur": 1}
    r = c.post("/api/generate", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    import time
    t0 = time.time()
    while (job := c.get(f"/api/jobs/{job_id}").json())["status"] not in ("done", "failed") and time.time() - t0 < 120:
        time.sleep(0.05)
    assert job["status"] == "done", job
    assert job["params"]["inpaint"] and job["images"][0]["record"]["task"] == "inpaint"
    got = Image.open(io.BytesIO(c.get(job["images"][0]["url"]).content))
    want = cf.inpaint(PROMPT, init, mask, steps=2, sampler="euler", seed=5, mask_blur=1).images[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    r = c.post("/api/generate", json=dict(body, mask=b64(Image.new("L", (64, 64), 0))))
    if r.status_code == 202:   # an empty mask fails the job with a clear message, never an image
        job_id = r.json()["id"]
        while (job := c.get(f"/api/jobs/{job_id}").json())["status"] not in ("done", "failed"):
            time.sleep(0.05)
        assert job["status"] == "failed" and "mask is empty" in json.dumps(job)
    else:
        assert r.status_code == 422 and "mask is empty" in r.text
    r = c.post("/api/generate", json={"prompt": PROMPT, "mask": b64(mask)})
    assert r.status_code == 422 and "init_image" in r.text
