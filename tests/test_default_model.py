"""The model shipped inside cpuflow: it loads offline, and its pictures are
right, as a program checks them (cpuflow.toyworld.evaluate). Unlike the tiny
random models elsewhere in the suite, this one is trained: these tests are
about image content, not only plumbing."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from cpuflow import Pipeline
from cpuflow.cli import main
from cpuflow.pipelines.model import shipped_model_dir
from cpuflow.toyworld import accuracy, evaluate, held_out_prompts, parse_prompt

pytestmark = pytest.mark.skipif(not (shipped_model_dir() / "cpuflow.json").exists(),
                                reason="the shipped model is not built in this checkout")


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(None, backend="openvino", precision="f32", threads=2) as p:
        yield p


@pytest.mark.parametrize("prompt", [
    "a red circle on a blue background",
    "a green triangle on a white background",
    "a yellow square on a purple background",
    "a black circle on an orange background",
])
def test_prompts_give_the_right_picture(pipe, prompt):
    attrs = parse_prompt(prompt)
    res = pipe.txt2img(prompt, seed=1)
    verdict = evaluate(res.images[0], attrs)
    assert all(verdict.values()), (prompt, verdict)
    assert res.records[0]["guidance"] == pipe.manifest.raw["defaults"]["guidance"]


def test_held_out_accuracy(pipe):
    """A sample of the held-out prompts (unseen wordings and seeds): every
    attribute at least 90% right with the model's defaults."""
    results = [evaluate(pipe.txt2img(p, seed=500 + i).images[0], a)
               for i, (p, a) in enumerate(held_out_prompts(24))]
    acc = accuracy(results)
    assert min(acc["color"], acc["shape"], acc["background"]) >= 0.9, acc


def test_both_backends_agree(pipe):
    with Pipeline.load(None, backend="onnxruntime") as ort:
        a = ort.txt2img("a white square on a green background", seed=3).images[0]
    b = pipe.txt2img("a white square on a green background", seed=3).images[0]
    import numpy as np
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    assert diff.max() <= 2


def test_readme_first_command(tmp_path, monkeypatch):
    """`cpuflow generate "a red circle on a blue background"` with no model argument."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["generate", "a red circle on a blue background", "--out", "red-circle.png"])
    assert r.exit_code == 0, r.output
    from PIL import Image
    img = Image.open(tmp_path / "red-circle.png")
    assert all(evaluate(img, parse_prompt("a red circle on a blue background")).values())
