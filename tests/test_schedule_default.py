"""`--schedule default` is what the model's scheduler config says (issue #16 item 1).

A model whose scheduler_config.json sets ``use_karras_sigmas`` (many community
models do) must give the image diffusers gives for it; ``--schedule uniform``
turns Karras sigmas off, ``karras`` on. Tiny random weights: parity, not quality.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_images import psnr  # noqa: E402
from helpers_models import with_scheduler  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.image import a1111_parameters, parse_a1111_parameters  # noqa: E402
from cpuflow.samplers import make_plan  # noqa: E402

SIZE, STEPS, PSNR_MIN = 64, 6, 50.0


@pytest.fixture(scope="module")
def karras_model(tiny_export, tmp_path_factory):
    """The tiny SD 1.x export with an Euler scheduler config that sets use_karras_sigmas."""
    t = tiny_export("sd1")
    out = tmp_path_factory.mktemp("karras-cfg") / "model"
    sched = with_scheduler(t.model, out, _class_name="EulerDiscreteScheduler", use_karras_sigmas=True)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(t.src, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(sched)   # as diffusers loads it
    assert pipe.scheduler.config.use_karras_sigmas
    with Pipeline.load(out, backend="onnxruntime", precision="f32", threads=2, use_cache=False) as cf:
        yield cf, pipe, sched


def _diffusers(pipe, karras: bool):
    base = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base.config, use_karras_sigmas=karras)
    try:
        return np.asarray(pipe("a red circle", num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                               width=SIZE, generator=torch.Generator("cpu").manual_seed(7)).images[0])
    finally:
        pipe.scheduler = base


def test_plan_keeps_the_models_karras_setting():
    cfg = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "use_karras_sigmas": True}
    assert make_plan("euler", cfg, 10).karras
    assert not make_plan("euler", cfg, 10, schedule="uniform").karras
    assert make_plan("euler", dict(cfg, use_karras_sigmas=False), 10, schedule="karras").karras
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(10)
    np.testing.assert_allclose(make_plan("euler", cfg, 10).sigmas, ref.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("schedule, karras", [("default", True), ("uniform", False)])
def test_default_schedule_is_the_models_own(karras_model, schedule, karras):
    cf, pipe, _ = karras_model
    ref = _diffusers(pipe, karras)
    res = cf.txt2img("a red circle", steps=STEPS, guidance=7.5, width=SIZE, height=SIZE, seed=7,
                     schedule=schedule)
    rec = res.records[0]
    assert rec["sampler"] == "euler" and rec["karras_sigmas"] is karras
    assert rec["scheduler_class"] == "EulerDiscreteScheduler" and "source_model_hash" not in rec   # a folder source
    said = parse_a1111_parameters(a1111_parameters(rec))["a1111_reproducible"]   # issue #16 item 6
    assert said.startswith("no: ") and ("Karras sigmas" in said) is karras
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"schedule {schedule}: {p:.1f} dB against diffusers with use_karras_sigmas={karras}"
