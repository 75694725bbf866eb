"""Digests of the compiled blobs OpenVINO writes into our cache, checked before
each import.

OpenVINO imports a cached blob without checking its content: a blob with
flipped bytes loads and computes wrong numbers (images far from the right
ones, with exit 0). So after every compile that wrote blobs we record each
blob's sha256 in ``cpuflow-blobs.json`` beside it, and before a compile that
would import a blob we check it. The check is cheap: digests come from a
:class:`~cpuflow.file_digests.DigestMemo`, so a blob is hashed once (when it
is recorded) and again only when its identity (inode, size, mtime, ctime)
changes, which any write to it does.

A blob whose digest does not match its record is deleted (OpenVINO then
compiles afresh and writes a new one) and reported in one warning line. A blob
with no record (written by an older cpuflow, or by a process killed before it
recorded it) is deleted without a warning: it cannot be trusted, and there is
nothing wrong to report.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..file_digests import DigestMemo

RECORD = "cpuflow-blobs.json"


# OpenVINO's compiled blobs, and ONNX Runtime's saved optimised graph with its weights
# (backends/onnxruntime_backend.py): every file a backend would load from our cache.
SUFFIXES = (".blob", ".onnx", ".data")


def _blobs(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder)
                      if e.name.endswith(SUFFIXES) and e.is_file(follow_symlinks=False))
    except OSError:
        return []


def _read_record(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def check(folder: Path | None, memo: DigestMemo, component: str) -> str | None:
    """Delete every blob in ``folder`` that does not match its recorded digest;
    a warning line when a recorded blob was damaged, else None."""
    if folder is None:
        return None
    record = _read_record(folder)
    damaged = []
    for blob in _blobs(folder):
        want = record.get(blob.name)
        try:
            ok = want is not None and memo.sha256(blob) == want
        except OSError:
            ok = False
        if ok:
            continue
        if want is not None:
            damaged.append(blob.name)
        try:
            blob.unlink()
        except FileNotFoundError:
            pass
    memo.save()
    if not damaged:
        return None
    return (f"{component}: the compiled-model cache held a damaged blob ({', '.join(damaged)}: its sha256 "
            "does not match the one recorded when it was written); it was deleted and the model compiled again")


def record(folder: Path | None, memo: DigestMemo) -> None:
    """Record the digest of every blob now in ``folder`` (after a compile that may have written one)."""
    if folder is None:
        return
    digests = {}
    for blob in _blobs(folder):
        try:
            digests[blob.name] = memo.sha256(blob)
        except OSError:
            continue
    tmp = folder / f"{RECORD}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(digests, indent=1), encoding="utf-8")
        os.replace(tmp, folder / RECORD)
    except OSError:
        pass   # no record: the next start recompiles instead of trusting the blob
    memo.save()
