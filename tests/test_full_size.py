"""Slow tier (opt in with --runslow): full-size architectures with random
weights, exported to both formats, then generated from with cpuflow.

Random weights: the images are noise; this proves the full-size export passes
its parity gate, fits in memory and runs, not image quality."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["sd15", "sd21-v"])
def test_full_size_random_export_and_generate(arch, tmp_path):
    pytest.importorskip("torch")
    import os
    from pathlib import Path

    from cpuflow import Pipeline
    from cpuflow.manifest import load_manifest
    from export.build import export_model
    from export.sources import load_source

    tok = Path(os.environ.get("CPUFLOW_CLIP_TOKENIZERS", ".cache/clip-tokenizers")) / (
        "sd1" if arch == "sd15" else "sd2")
    if not (tok / "vocab.json").exists():
        pytest.skip("needs the CLIP tokenizer files: bash scripts/fetch_clip_vocab.sh")
    out = export_model(load_source(None, random_weights=True, arch=arch, tokenizer=tok), tmp_path / arch)
    m = load_manifest(out, verify="sha256")
    assert m.random_weights and m.validated
    for comp in m.components.values():
        for fmt, par in comp.variants["fp32"].parity.items():
            assert par["passed"] and par["psnr_db"] >= 60, (comp.name, fmt, par)
    with Pipeline.load(out, backend="openvino", precision="f32") as pipe:
        res = pipe.txt2img("a photo", steps=2, width=256, height=256, seed=0)
    assert res.images[0].size == (256, 256)
    assert np.isfinite(np.asarray(res.images[0], np.float32)).all()
