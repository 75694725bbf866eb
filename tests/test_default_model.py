"""The model shipped inside cpuflow: it loads offline, and its pictures are
right, as a program checks them (cpuflow.toyworld.evaluate). Unlike the tiny
random models elsewhere in the suite, this one is trained: these tests are
about image content, not only plumbing."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from cpuflow import Pipeline
from cpuflow.cli import main
from cpuflow.cpu import int8_dot_products_exact
from cpuflow.pipelines.model import shipped_model_dir
from cpuflow.toyworld import accuracy, evaluate, held_out_prompts, parse_prompt

pytestmark = pytest.mark.skipif(not (shipped_model_dir() / "cpuflow.json").exists(),
                                reason="the shipped model is not built in this checkout")


@pytest.fixture(scope="module")
def pipe():
    # the user's defaults: precision auto, which this model's manifest maps to f32
    with Pipeline.load(None, backend="openvino", threads=2) as p:
        yield p


def test_defaults_are_the_issues_targets(pipe):
    """The shipped model is meant for guidance 5, 20 steps, f32 compute (issue #5); its
    variant is the gate's (issue #15 item 2: full int8, which keeps the judge within
    1.4 points of fp32, tests/test_variant_choice.py)."""
    d = pipe.manifest.raw["defaults"]
    assert (d["guidance"], d["steps"], d["precision"]) == (5.0, 20, "f32") and "variant" not in d
    rec = pipe.txt2img("a red circle on a blue background", seed=1).records[0]
    assert (rec["guidance"], rec["steps"], rec["precision"]) == (5.0, 20, "f32")
    # int8 activations only where the CPU sums int8 products exactly (VNNI / AMX; cpuflow/cpu.py)
    assert rec["variant"]["unet"] == ("int8" if int8_dot_products_exact() else "int8-weights")


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


def test_int8_weights_variant_accuracy():
    """The int8 (weight-only) variant keeps the fp32 accuracy (issue #5: within
    2 points on the 72 held-out prompts, bench/default_model_training.md)."""
    with Pipeline.load(None, backend="openvino", variant="int8-weights", threads=2) as p:
        results = [evaluate(p.txt2img(q, seed=500 + i).images[0], a)
                   for i, (q, a) in enumerate(held_out_prompts(24))]
        assert p.txt2img("a red circle", seed=1).records[0]["variant"]["unet"] == "int8-weights"
    acc = accuracy(results)
    assert min(acc["color"], acc["shape"], acc["background"]) >= 0.9, acc


# OpenVINO's CPU plugin held to AVX2 (no AVX-512, no bf16): how a plain AVX2 laptop runs it.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2"}
PRECISION_CHECK = """
import json, openvino as ov
from cpuflow import Pipeline
with Pipeline.load(None, backend="openvino", precision="bf16", threads=2, use_cache=False) as p:
    rec = p.txt2img("a red circle", seed=1, steps=2).records[0]
    print(json.dumps({"asked": p.model.options.precision, "ran": rec["precision"],
                      "cpu_bf16": "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}))
"""


@pytest.mark.parametrize("cpu", ["this CPU", "AVX2 only"])
def test_explicit_precision_beats_the_manifest_default(cpu):
    """An explicit --precision bf16 wins over the manifest's f32: the backend is asked
    for bf16, and the record says what the CPU ran: bf16 with AMX / AVX512-BF16, f32
    on a CPU without bf16 (OpenVINO runs the hint in f32 there). Both CPU kinds are
    checked on every machine: the second with OpenVINO held to AVX2."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, **(AVX2_ONLY if cpu == "AVX2 only" else {}))
    out = subprocess.run([sys.executable, "-c", PRECISION_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["asked"] == "bf16"
    assert r["ran"] == ("bf16" if r["cpu_bf16"] else "f32"), r
    if cpu == "AVX2 only":
        assert not r["cpu_bf16"]


def test_bad_manifest_precision_is_a_clear_error(tmp_path):
    import json
    import shutil

    from cpuflow.errors import ModelError
    from cpuflow.manifest import MANIFEST_NAME

    d = tmp_path / "m"
    shutil.copytree(shipped_model_dir(), d)
    data = json.loads((d / MANIFEST_NAME).read_text())
    data["defaults"]["precision"] = "fp8"
    (d / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="default precision 'fp8'"):
        Pipeline.load(d, backend="openvino")


def test_both_backends_agree():
    """fp32 on both backends: the same picture to 2 levels (their int8 files are two
    different quantizations, NNCF's and ONNX Runtime's, checked by the judge instead)."""
    import numpy as np
    imgs = []
    for backend in ("onnxruntime", "openvino"):
        with Pipeline.load(None, backend=backend, variant="fp32", threads=2) as p:
            imgs.append(np.asarray(p.txt2img("a white square on a green background", seed=3).images[0], np.int16))
    assert np.abs(imgs[0] - imgs[1]).max() <= 2


README_PROMPT = "a red circle on a blue background"


def test_readme_first_command(tmp_path, monkeypatch):
    """`cpuflow generate "a red circle on a blue background"` with no model argument. The command
    draws a random seed; it is fixed here so that the picture checked is the same on every run
    (a random seed made this test fail in the few percent of seeds the model gets wrong)."""
    import cpuflow.config
    from cpuflow.image import read_png_metadata
    monkeypatch.setattr(cpuflow.config, "random_seed", lambda: 5)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["generate", README_PROMPT, "--out", "red-circle.png"])
    assert r.exit_code == 0, r.output
    from PIL import Image
    img = Image.open(tmp_path / "red-circle.png")
    assert img.size == (64, 64) and read_png_metadata(tmp_path / "red-circle.png")["seed"] == 5
    assert all(evaluate(img, parse_prompt(README_PROMPT)).values())


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_readme_prompt_comes_out_right_for_most_seeds(backend):
    """What a user of the README's command sees across random seeds, on either backend with
    its default variant: at least 14 of 16 seeds right. Measured on an AMD EPYC with AVX512-VNNI:
    OpenVINO 100 of seeds 0-99, ONNX Runtime 98; OpenVINO under qemu-user's Haswell CPU (AVX2
    only, like most laptops, where int8 runs without VNNI): 40 of seeds 0-39."""
    with Pipeline.load(None, backend=backend, threads=2) as p:
        right = [all(evaluate(p.txt2img(README_PROMPT, seed=s).images[0], parse_prompt(README_PROMPT)).values())
                 for s in range(16)]
    assert sum(right) >= 14, [s for s, ok in enumerate(right) if not ok]
