"""Full int8 for few-step models (issue #15 item 5): an SD-Turbo style export
calibrates on the trajectory it runs (1 step, no guidance), its held-out figure
measures that trajectory, and the runtime runs the int8 UNet at 1 step.

Tiny random weights: the figures prove the plumbing, not image quality (the
full-size SD-Turbo architecture's figures are in bench/README.md).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("nncf")

from cpuflow import Pipeline  # noqa: E402
from cpuflow.manifest import load_manifest  # noqa: E402
from cpuflow.variants import choose_variant, fidelity_db  # noqa: E402
from export.calibrate import DEFAULT_SAMPLES, DEFAULT_STEPS, plan_for_model  # noqa: E402


def test_plan_follows_a_few_step_models_own_steps():
    pool = [f"p{i}" for i in range(64)]
    four = pool[:4]
    # no few-step defaults (or many steps): the usual 10-step run on the given prompts
    assert plan_for_model(None, None, four, pool, 16) == (DEFAULT_STEPS, four)
    assert plan_for_model({"steps": 20, "guidance": 5}, None, four, pool, 16) == (DEFAULT_STEPS, four)
    # SD-Turbo: 1 step, so 16 prompts give the 16 samples; LCM: 4 steps x 4 prompts already do
    assert plan_for_model({"steps": 1, "guidance": 0.0}, None, four, pool, 16) == (1, pool[:16])
    assert plan_for_model({"steps": 4}, None, four, pool, 16) == (4, four)
    assert plan_for_model({"steps": 1}, None, four, pool[:6], 16) == (1, pool[:6])   # no more prompts than given
    assert plan_for_model({"steps": 1}, None, four, pool, None) == (1, four)         # "all": what the prompts make
    # the user's --calibration-steps always wins
    assert plan_for_model({"steps": 1}, 3, four, pool, 16) == (3, four)


@pytest.fixture(scope="module")
def turbo_int8(tmp_path_factory):
    from helpers_fewstep import save_tiny_turbo_folder

    from export.build import export_model
    from export.sources import load_source
    base = tmp_path_factory.mktemp("turbo-int8")
    src = save_tiny_turbo_folder(base / "src")
    return export_model(load_source(str(src)), base / "model", formats=("openvino",), quantize=("int8",),
                        default_steps=1, default_guidance=0.0, progress=lambda ev: None)


def test_turbo_calibrates_and_is_judged_on_its_own_trajectory(turbo_int8):
    raw = json.loads((turbo_int8 / "cpuflow.json").read_text())
    cal = raw["export"]["quantize"]["calibration"]
    assert raw["defaults"]["steps"] == 1 and raw["defaults"]["guidance"] == 0.0
    assert (cal["steps"], cal["guidance"], cal["batch"]) == (1, 0.0, 1)   # no guidance: batch-1 UNet inputs
    assert cal["prompts"] == cal["samples"] == DEFAULT_SAMPLES            # 16 prompts x 1 call
    held = raw["components"]["unet"]["variants"]["int8"]["parity"]["openvino"]["held_out"]
    assert held["points"] == cal["held_out_calls"] == 1                   # the 1-step run's one call
    assert np.isfinite(held["psnr_db"])


def test_the_runtime_runs_the_int8_unet_at_one_step(turbo_int8):
    m = load_manifest(turbo_int8)
    choice = choose_variant(m, "openvino")
    figure = fidelity_db(m, "int8", "openvino")
    assert choice.name == ("int8" if figure is not None and figure >= 48.0 else "fp32"), choice
    images = {}
    for variant in ("int8", "fp32"):
        with Pipeline.load(turbo_int8, backend="openvino", variant=variant, precision="f32",
                           use_cache=False) as pipe:
            res = pipe.txt2img("a red circle", seed=3)     # the model's defaults: 1 step, guidance 0
        assert res.records[0]["variant"]["unet"] == variant
        assert (res.records[0]["steps"], res.records[0]["guidance"]) == (1, 0.0)
        images[variant] = np.asarray(res.images[0], dtype=np.float32)
    assert np.isfinite(images["int8"]).all()
    assert not np.array_equal(images["int8"], images["fp32"])   # the int8 UNet ran, not the fp32 one
    mse = float(np.mean((images["int8"] - images["fp32"]) ** 2))
    assert 10 * np.log10(255.0 ** 2 / mse) > 20    # and is a quantization of it, not garbage
