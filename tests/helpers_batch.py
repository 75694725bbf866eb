"""Shared by the batch tests: jobs files and the images `cpuflow generate` makes for the same jobs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a blue circle on a yellow background"]
STEPS = 4
_REFERENCE: dict = {}


def write_jobs(path: Path, prompts, seeds, steps: int = STEPS, extra_lines=()) -> Path:
    """One line per (prompt, seed): the JSON POST /api/generate takes."""
    lines = [json.dumps({"prompt": p, "seed": s, "steps": steps}) for p in prompts for s in seeds]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


REF_SEEDS = range(10)


def generate_reference(tmp: Path, prompt: str, seeds, threads: int = 1) -> dict:
    """{seed: pixels} for seeds in 0..9 from one `cpuflow generate PROMPT --seed 0 --n-samples 10
    --steps 4 --threads 1` (the shipped model); made once per prompt and session."""
    assert set(seeds) <= set(REF_SEEDS)
    key = (prompt, threads)
    if key not in _REFERENCE:
        from cpuflow.cli import main
        out = tmp / f"ref-{len(_REFERENCE)}"
        r = CliRunner().invoke(main, ["generate", prompt, "--seed", "0", "--n-samples", str(len(REF_SEEDS)),
                                      "--steps", str(STEPS), "--threads", str(threads), "--out", str(out), "-q"])
        assert r.exit_code == 0, r.output
        files = sorted(out.glob("image-*.png"))
        assert len(files) == len(REF_SEEDS)
        _REFERENCE[key] = {s: np.asarray(Image.open(f)) for s, f in zip(REF_SEEDS, files)}
    return {s: _REFERENCE[key][s] for s in seeds}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def journal(out: Path) -> list[dict]:
    p = out / "journal.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
