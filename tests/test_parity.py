"""End-to-end parity with diffusers on the same tiny random weights.

For each sampler, both prediction types, txt2img and img2img, on both backends:
cpuflow's 8-bit image and diffusers' StableDiffusionPipeline image agree to
at least 50 dB PSNR with float32 compute. (Why 50: on tiny random models two
different samplers from the same seed often differ by 35-50 dB, so a lower
bar could not tell a wrong sampler from a right one.)

These images come from RANDOM weights: they prove plumbing and numerics, not
image quality.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_images import psnr  # noqa: E402
from helpers_tiny import save_tiny_diffusers_folder  # noqa: E402

from cpuflow import Pipeline  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
STEPS = 6

# The diffusers scheduler each cpuflow sampler must reproduce, built from the
# model's own scheduler config as XScheduler.from_config(config, **overrides).
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "lcm": ("LCMScheduler", {}),
}
KARRAS = ("euler", "heun", "dpmpp_2m")


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def exported(request, tiny_export):
    """A tiny model saved as a diffusers folder and exported to both formats."""
    kind = request.param
    t = tiny_export(kind)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(t.src, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return kind, t.src, t.model, pipe


def _reference_scheduler(pipe, sampler, schedule):
    cls_name, overrides = REFERENCE[sampler]
    cls = getattr(diffusers, cls_name)
    if schedule == "karras":
        overrides = dict(overrides, use_karras_sigmas=True)
    return cls.from_config(pipe.scheduler.config, **overrides)


def _diffusers_image(pipe, sampler, schedule="default", init=None, strength=0.8, seed=7, guidance=7.5,
                     eta=0.0, negative=""):
    base_sched = pipe.scheduler
    pipe.scheduler = _reference_scheduler(pipe, sampler, schedule)
    try:
        kw = dict(prompt="a red circle", negative_prompt=negative, num_inference_steps=STEPS,
                  guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
        if sampler == "ddim":
            kw["eta"] = eta
        if init is None:
            img = pipe(height=SIZE, width=SIZE, **kw).images[0]
        else:
            i2i = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
            i2i.set_progress_bar_config(disable=True)
            img = i2i(image=init, strength=strength, **kw).images[0]
    finally:
        pipe.scheduler = base_sched
    return np.asarray(img)


_PIPES: dict = {}


class _Shared:
    """One loaded cpuflow pipeline per (model, backend) for the whole module:
    sessions are compiled once per shape, as in a long-running process."""

    def __init__(self, out, backend):
        key = (str(out), backend)
        if key not in _PIPES:
            _PIPES[key] = Pipeline.load(out, backend=backend, precision="f32", threads=2, use_cache=False)
        self.pipe = _PIPES[key]

    def __enter__(self):
        return self.pipe

    def __exit__(self, *exc):
        return False


def _cpuflow_pipe(out, backend):
    return _Shared(out, backend)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_txt2img_matches_diffusers(exported, backend, sampler):
    kind, _, out, pipe = exported
    ref = _diffusers_image(pipe, sampler)
    with _cpuflow_pipe(out, backend) as cf:
        res = cf.txt2img("a red circle", watermark=False, negative_prompt="", steps=STEPS, sampler=sampler, guidance=7.5,
                         width=SIZE, height=SIZE, seed=7)
    got = np.asarray(res.images[0])
    assert got.shape == ref.shape
    p = psnr(got, ref)
    assert p >= PSNR_MIN, f"{kind} {sampler} {backend}: {p:.1f} dB"


@pytest.mark.parametrize("sampler", KARRAS)
def test_karras_schedule_matches_diffusers(exported, sampler):
    kind, _, out, pipe = exported
    ref = _diffusers_image(pipe, sampler, schedule="karras")
    with _cpuflow_pipe(out, "onnxruntime") as cf:
        res = cf.txt2img("a red circle", watermark=False, steps=STEPS, sampler=sampler, schedule="karras", guidance=7.5,
                         width=SIZE, height=SIZE, seed=7)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{kind} {sampler} karras: {p:.1f} dB"


def test_ddim_eta_and_negative_prompt_match(exported):
    kind, _, out, pipe = exported
    ref = _diffusers_image(pipe, "ddim", eta=0.7, negative="blurry, ugly")
    with _cpuflow_pipe(out, "openvino") as cf:
        res = cf.txt2img("a red circle", watermark=False, negative_prompt="blurry, ugly", steps=STEPS, sampler="ddim", eta=0.7,
                         guidance=7.5, width=SIZE, height=SIZE, seed=7)
    assert psnr(np.asarray(res.images[0]), ref) >= PSNR_MIN


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m", "plms"])
def test_img2img_matches_diffusers(exported, backend, sampler):
    from PIL import Image
    kind, _, out, pipe = exported
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = _diffusers_image(pipe, sampler, init=init, strength=0.6)
    with _cpuflow_pipe(out, backend) as cf:
        res = cf.img2img("a red circle", init, watermark=False, strength=0.6, steps=STEPS, sampler=sampler, guidance=7.5, seed=7)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{kind} img2img {sampler} {backend}: {p:.1f} dB"


def test_no_guidance_skips_the_negative_branch(exported):
    kind, _, out, pipe = exported
    ref = _diffusers_image(pipe, "euler", guidance=1.0)
    with Pipeline.load(out, backend="onnxruntime", threads=2) as cf:   # fresh: count its sessions
        res = cf.txt2img("a red circle", watermark=False, steps=STEPS, sampler="euler", guidance=1.0, width=SIZE, height=SIZE,
                         seed=7)
        unet_dims = [dims for name, dims, _ in cf.model.loaded_sessions() if name == "unet"]
    assert psnr(np.asarray(res.images[0]), ref) >= PSNR_MIN
    assert all(d["batch"] == 1 for d in unet_dims)


def test_seed_determinism_and_records(exported):
    _, _, out, _ = exported
    with _cpuflow_pipe(out, "openvino") as cf:
        a = cf.txt2img("a red circle", steps=3, width=SIZE, height=SIZE, seed=11, n_samples=2)
        b = cf.txt2img("a red circle", steps=3, width=SIZE, height=SIZE, seed=11)
        c = cf.txt2img("a red circle", steps=3, width=SIZE, height=SIZE, seed=12)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert np.array_equal(np.asarray(a.images[1]), np.asarray(c.images[0]))   # image k uses seed+k
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    rec = a.records[1]
    assert rec["seed"] == 12 and rec["backend"] == "openvino" and rec["precision"] == "f32"
    assert rec["model_hash"] and rec["steps"] == 3
