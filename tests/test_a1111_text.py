"""The A1111 "parameters" text does not mislead (issue #16 item 6): it says plainly
that A1111 cannot reproduce the image (cpuflow follows diffusers' step spacing),
names no A1111 schedule for diffusers' Karras, says what A1111 would need (the
checkpoint, RNG: CPU), and its "Model hash" is A1111's hash of the source
checkpoint (sha256 of the file, first 10 hex digits), never the export's hash."""
from __future__ import annotations

import hashlib

from cpuflow import image as cimg
from cpuflow.manifest import load_manifest, write_manifest

RECORD = {"prompt": "a fox", "seed": 3, "sampler": "euler", "schedule": "karras", "steps": 20, "guidance": 7.5,
          "width": 512, "height": 512, "model_name": "m", "model_hash": "0123456789abcdef", "rng": "torch",
          "scheduler_class": "EulerDiscreteScheduler", "timestep_spacing": "leading", "karras_sigmas": True}


def test_text_says_a1111_cannot_reproduce_and_names_no_schedule():
    text = cimg.a1111_parameters(RECORD)
    assert "Schedule type" not in text and "Karras" not in text.split("A1111 reproducible")[0]
    assert "Model hash:" not in text         # the export's hash is no checkpoint A1111 knows
    assert "RNG: CPU" in text
    said = cimg.parse_a1111_parameters(text)["a1111_reproducible"]
    assert said.startswith("no: ") and "EulerDiscreteScheduler" in said and "leading" in said
    assert cimg.parse_a1111_parameters(text)["rng"] == "torch"


def test_model_hash_is_the_source_checkpoints_a1111_hash(tmp_path):
    ckpt = b"pretend safetensors bytes"
    sha = hashlib.sha256(ckpt).hexdigest()
    text = cimg.a1111_parameters(dict(RECORD, source_model_hash=sha[:10]))
    assert f"Model hash: {sha[:10]}," in text
    # the manifest knows it for single-file sources only
    from test_manifest import make_manifest
    data = make_manifest(tmp_path)

    def a1111_hash(source):
        write_manifest(tmp_path, dict(data, source=source))
        return load_manifest(tmp_path).a1111_hash
    assert a1111_hash(data["source"]) is None   # random weights: no checkpoint file
    assert a1111_hash({"kind": "single_file", "name": "model.safetensors", "sha256": sha}) == sha[:10]
    assert a1111_hash({"kind": "diffusers_folder", "name": "m", "sha256": sha}) is None
