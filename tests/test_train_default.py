"""The training script of the shipped model (export/train_default.py) runs end
to end at toy step counts: from scratch (VAE, tokenizer, text encoder, UNet),
then the paired guidance distillation that made the shipped v4. The real runs
(minutes, not steps) are documented in bench/default_model_training.md; this
only proves the script and its options work and write a loadable diffusers folder."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")


def _load(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                   requires_safety_checker=False)


def test_scratch_then_paired_distillation(tmp_path):
    from export.train_default import main

    scratch, distilled = tmp_path / "v1", tmp_path / "v4"
    assert main(["--out", str(scratch), "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "2",
                 "--unet-batch", "4", "--minutes", "10", "--eval-n", "2"]) == 0
    summary = json.loads((scratch / "train_summary.json").read_text())
    assert summary["unet"]["steps"] == 2 and "held_out" in summary["eval"]
    assert (scratch / "tokenizer" / "vocab.json").exists() and (scratch / "tokenizer" / "merges.txt").exists()

    assert main(["--init-from", str(scratch), "--out", str(distilled), "--unet-steps", "2", "--unet-batch", "2",
                 "--guidance-distill", "2.5", "--distill-pair-guidance", "5", "--minutes", "10",
                 "--eval-n", "2"]) == 0
    summary = json.loads((distilled / "train_summary.json").read_text())
    assert summary["args"]["distill_pair_guidance"] == "5.0" and summary["unet"]["steps"] == 2
    a, b = _load(scratch), _load(distilled)
    # the VAE is kept, the UNet changed
    va, vb = a.vae.state_dict(), b.vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    ua, ub = a.unet.state_dict(), b.unet.state_dict()
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)
