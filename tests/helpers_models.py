"""Copies of exported test models with one part of their manifest changed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cpuflow.manifest import MANIFEST_NAME


def with_scheduler(model: Path, out: Path, **changes) -> dict:
    """Copy the exported folder ``model`` to ``out`` with ``changes`` made to its
    scheduler config; returns the new scheduler config."""
    shutil.copytree(model, out)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw["scheduler"] = dict(raw["scheduler"], **changes)
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    return raw["scheduler"]
