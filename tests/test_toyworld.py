"""cpuflow.toyworld: prompt grammar, renderer and the program-checked evaluator.

Torch-free: nothing here (nor in cpuflow.toyworld) may import torch.
"""

import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cpuflow import toyworld as tw


def _noisy(im, sigma, seed=0):
    a = np.asarray(im, dtype=np.float32)
    a = a + np.random.default_rng(seed).normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_module_is_torch_free():
    code = "import sys, cpuflow.toyworld; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_world_size_and_palette():
    kinds = tw.all_attrs()
    assert len(kinds) == 8 * 7 * 3
    assert all(a.color != a.background for a in kinds)
    assert len(set(tw.PALETTE.values())) == 8


def test_render_deterministic_and_varied():
    a = tw.Attrs("red", "circle", "blue")
    im1, im2 = tw.render(a, seed=3), tw.render(a, seed=3)
    assert im1.size == (64, 64) and im1.mode == "RGB"
    assert np.array_equal(np.asarray(im1), np.asarray(im2))
    assert not np.array_equal(np.asarray(im1), np.asarray(tw.render(a, seed=4)))
    with pytest.raises(ValueError):
        tw.render(tw.Attrs("red", "circle", "red"))


def test_evaluator_on_ground_truth_clean_blurred_noisy():
    results = []
    for i, a in enumerate(tw.all_attrs()):
        for s in range(3):
            im = tw.render(a, seed=i * 10 + s)
            for variant in (im, im.filter(ImageFilter.GaussianBlur(1.0)), _noisy(im, 10, i)):
                results.append(tw.evaluate(variant, a))
    acc = tw.accuracy(results)
    assert acc == {"color": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}


def test_evaluator_accepts_arrays_and_mappings():
    a = tw.Attrs("yellow", "triangle", "purple")
    im = tw.render(a, seed=1)
    arr = np.asarray(im)
    assert all(tw.evaluate(arr, a._asdict()).values())
    assert all(tw.evaluate(arr / 255.0, tuple(a)).values())


@pytest.mark.parametrize("field", ["color", "shape", "background"])
def test_evaluator_fails_wrong_images(field):
    rng = random.Random(7)
    kinds = tw.all_attrs()
    for _ in range(60):
        a = rng.choice(kinds)
        options = {"color": tw.COLORS, "shape": tw.SHAPES, "background": tw.COLORS}[field]
        wrong = a._replace(**{field: rng.choice([o for o in options if o != getattr(a, field)])})
        if wrong.color == wrong.background:
            continue
        res = tw.evaluate(tw.render(wrong, seed=rng.randrange(100)), a)
        assert res[field] is False
        others = [k for k in tw.ATTRIBUTES if k != field]
        assert all(res[k] for k in others), (a, wrong, res)


def test_evaluator_fails_blank_and_noise_images():
    a = tw.Attrs("red", "square", "blue")
    blank = Image.new("RGB", (64, 64), tw.PALETTE["blue"])
    res = tw.evaluate(blank, a)
    assert res == {"color": False, "shape": False, "background": True}
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert not all(tw.evaluate(noise, a).values())


def test_shape_features():
    for shape, lo, hi in (("circle", 0.70, 0.86), ("square", 0.90, 1.01), ("triangle", 0.4, 0.62)):
        got = tw.analyze(tw.render(tw.Attrs("white", shape, "black"), seed=2))
        assert got["shape"] == shape and lo <= got["fill"] <= hi, got


def test_prompt_grammar_roundtrip_and_determinism():
    for a in tw.all_attrs():
        for t in tw.ALL_TEMPLATES:
            assert tw.parse_prompt(tw.format_prompt(a, t)) == a
    a = tw.Attrs("red", "circle", "blue")
    assert tw.format_prompt(a) == "a red circle on a blue background"
    s1 = [tw.sample_prompt(a, random.Random(5)) for _ in range(3)]
    s2 = [tw.sample_prompt(a, random.Random(5)) for _ in range(3)]
    assert s1 == s2
    seen = {tw.sample_prompt(a, i) for i in range(200)}
    assert seen == {tw.format_prompt(a, t) for t in tw.TRAIN_TEMPLATES}


def test_parse_free_wordings():
    want = tw.Attrs("red", "circle", "blue")
    for p in ("a red circle on a blue background", "red circle, blue background",
              "a circle in red on blue", "a red circle against a blue backdrop",
              "A Red Circle on a Blue background."):
        assert tw.parse_prompt(p) == want, p
    assert tw.parse_prompt("a cat on a sofa") is None


def test_held_out_prompts():
    items = tw.held_out_prompts()
    assert items == tw.held_out_prompts()
    assert 48 <= len(items) <= 96
    assert len({p for p, _ in items}) == len(items)
    train = set(tw.TRAIN_TEMPLATES)
    assert not train & set(tw.HELD_OUT_TEMPLATES)
    for p, a in items:
        assert tw.parse_prompt(p) == a
        assert p not in {tw.format_prompt(a, t) for t in train}
    for field, values in (("shape", tw.SHAPES), ("color", tw.COLORS), ("background", tw.COLORS)):
        counts = {v: sum(getattr(a, field) == v for _, a in items) for v in values}
        assert min(counts.values()) >= 3, (field, counts)


def test_vocabulary_covers_prompts():
    vocab = set(tw.vocabulary())
    for p, _ in tw.held_out_prompts():
        for w in p.replace(",", " , ").split():
            assert w in vocab


def test_accuracy():
    r = [{"color": True, "shape": True, "background": False},
         {"color": True, "shape": False, "background": True}]
    assert tw.accuracy(r) == {"color": 1.0, "shape": 0.5, "background": 0.5, "all": 0.0}
    assert tw.accuracy([])["all"] == 0.0
