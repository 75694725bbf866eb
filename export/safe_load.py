"""Reading weight files without ever running code from them.

The loader is chosen by the file's CONTENT (its first bytes), never by its
extension:

* ``safetensors``: an 8-byte little-endian header length, then a JSON header
  that starts with ``{``; the header length and every tensor's byte range are
  checked against the file size before the file is handed to ``safetensors``.
* a pickle container: a zip (``PK\\x03\\x04``, torch's current ``torch.save``
  format) or a bare pickle (``0x80`` + protocol byte, torch's legacy format).

A pickle is refused unless the caller passes ``allow_pickle=True`` (the CLI's
``--allow-pickle``). Even then it is not unpickled in this process: a fresh
``python -I`` child runs ``torch.load(path, weights_only=True, map_location="cpu")``
(torch's restricted unpickler: tensors, dicts, lists and numbers only) and
writes the tensors to a temporary ``.safetensors`` file that this process then
reads like any other safetensors file. There is no fallback to
``weights_only=False``: a pickle that needs arbitrary Python objects is refused.

Every problem is reported as a :class:`~cpuflow.errors.SourceError` (or
:class:`~cpuflow.errors.UnsafeFileError` for the security refusals) that names
the file.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cpuflow.errors import MissingDependency, SourceError, UnsafeFileError

SAFETENSORS = "safetensors"
PICKLE_ZIP = "pickle-zip"        # torch.save's default (zip archive holding data.pkl)
PICKLE = "pickle"                # torch.save(_use_new_zipfile_serialization=False), raw pickles

ZIP_MAGIC = b"PK\x03\x04"
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
# safetensors refuses headers above 100 MB; so do we (a random 8-byte prefix
# read as a length is almost always far larger).
MAX_HEADER_BYTES = 100 * 1000 * 1000
# dtype -> bytes per element, as in the safetensors format specification.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}

ALLOW_PICKLE_HINT = (
    "pass --allow-pickle (allow_pickle=True) only if you trust the file (it is then read with "
    "torch.load(weights_only=True) in a separate process), or convert it to .safetensors"
)

# Seconds the pickle-reading child may take (a 7 GB checkpoint on a slow disk).
PICKLE_CHILD_TIMEOUT_S = float(os.environ.get("CPUFLOW_PICKLE_TIMEOUT_S", 1800))


@dataclass
class WeightsFile:
    """What :func:`load_state_dict` read."""

    path: Path
    format: str                                   # SAFETENSORS | PICKLE_ZIP | PICKLE
    state_dict: dict                              # name -> torch.Tensor (CPU)
    metadata: dict[str, str] = field(default_factory=dict)   # safetensors __metadata__
    global_step: int | None = None                # a pickle's top-level "global_step"
    skipped: list[str] = field(default_factory=list)          # non-tensor entries left out


def _not_a_checkpoint(path: Path, why: str) -> SourceError:
    return SourceError(f"not a checkpoint: {path}: {why}")


def sniff(path: str | os.PathLike) -> str:
    """The container format of ``path`` from its first bytes (and size).

    Returns :data:`SAFETENSORS`, :data:`PICKLE_ZIP` or :data:`PICKLE`; raises
    :class:`SourceError` naming the file for anything else (missing, a folder,
    empty, a git-lfs pointer, an HTML page, truncated, random bytes)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"no such file: {p}")
    if p.is_dir():
        raise SourceError(f"{p} is a folder, not a weights file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise SourceError(f"cannot read {p}: {e.strerror or e}") from None
    if size == 0:
        raise _not_a_checkpoint(p, "the file is empty")
    if head.startswith(LFS_POINTER_PREFIX):
        raise _not_a_checkpoint(
            p, "it is a git-lfs pointer, not the weights (run `git lfs pull`, or download the file itself)")
    if head.startswith(ZIP_MAGIC):
        # Only the zip directory is read (no unpickling): torch.save archives hold a data.pkl.
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            raise _not_a_checkpoint(p, "a damaged zip archive (truncated or corrupted torch checkpoint?)") from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise _not_a_checkpoint(p, "a zip archive that is not a torch checkpoint (no data.pkl)")
        return PICKLE_ZIP
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return PICKLE
    if size >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= MAX_HEADER_BYTES and head[8:9] == b"{":
            if 8 + n > size:
                raise _not_a_checkpoint(
                    p, f"truncated safetensors file (header says {n} bytes, the file has {size - 8} after the length)")
            return SAFETENSORS
    lower = head.lstrip().lower()
    if lower.startswith((b"<!doctype", b"<html", b"<?xml")):
        raise _not_a_checkpoint(p, "it is an HTML/XML page (a failed download?)")
    if lower.startswith(b"{"):
        raise _not_a_checkpoint(p, "it is a JSON/text file, not weights")
    raise _not_a_checkpoint(p, "unknown format (neither safetensors nor a torch checkpoint; truncated or corrupted?)")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, validated against the file size.

    Checks: the header is JSON (an object), every entry has a known dtype, a
    shape and data offsets that agree with each other and lie inside the file."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _not_a_checkpoint(p, "too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _not_a_checkpoint(p, f"bad safetensors header length {n} for a file of {size} bytes")
        header_bytes = f.read(n)
    if not header_bytes.startswith(b"{"):
        raise _not_a_checkpoint(p, "the safetensors header is not a JSON object")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_a_checkpoint(p, "the safetensors header is not valid JSON (corrupted?)") from None
    if not isinstance(header, dict):
        raise _not_a_checkpoint(p, "the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _not_a_checkpoint(p, "the safetensors __metadata__ is not an object")
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
            if dtype not in _DTYPE_SIZES or not (isinstance(start, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _not_a_checkpoint(p, f"bad safetensors entry for tensor {name!r}") from None
        if not 0 <= start <= end:
            raise _not_a_checkpoint(p, f"bad data offsets for tensor {name!r}")
        if end > data_len:
            raise _not_a_checkpoint(
                p, f"truncated: tensor {name!r} ends at byte {end} but the file holds {data_len} data bytes")
        if end - start != numel * _DTYPE_SIZES[dtype]:
            raise _not_a_checkpoint(p, f"tensor {name!r}: {end - start} bytes for {dtype}{shape}")
    return header, {str(k): str(v) for k, v in metadata.items()}


def _read_safetensors(p: Path) -> tuple[dict, dict[str, str]]:
    _, metadata = read_safetensors_header(p)
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - export extra not installed
        raise MissingDependency("reading weights needs safetensors and torch: pip install 'cpuflow[export]'") from None
    try:
        sd = load_file(str(p), device="cpu")
    except Exception as e:  # safetensors_rust.SafetensorError and friends
        raise _not_a_checkpoint(p, f"safetensors could not read it ({e})") from None
    return sd, metadata


# --- pickles: only in a child process, only with weights_only=True --------------------
# The child never imports anything from the current directory (-I: isolated mode,
# no cwd on sys.path, no PYTHON* variables, no user site-packages).
_CHILD = r'''
import json, sys
src, dst, use_mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def fail(kind, msg):
    sys.stderr.write("\nCPUFLOW-CHILD-ERROR " + json.dumps({"kind": kind, "message": msg}) + "\n")
    sys.exit(3)
try:
    import torch
    from safetensors.torch import save_file
except Exception as e:
    fail("missing", repr(e))
try:
    obj = torch.load(src, map_location="cpu", weights_only=True, mmap=use_mmap)
except Exception as e:
    msg = str(e)
    if "Weights only load failed" in msg or "Unsupported global" in msg or "UnpicklingError" in type(e).__name__:
        why = [l.strip() for l in msg.splitlines() if "WeightsUnpickler error" in l or "Unsupported" in l]
        fail("unsafe", (why[0] if why else "it is not a plain dict of tensors")[:500])
    fail("unreadable", type(e).__name__ + ": " + msg.strip().splitlines()[0][:500] if msg.strip() else type(e).__name__)
info = {"global_step": None, "skipped": []}
if isinstance(obj, dict) and isinstance(obj.get("global_step"), int):
    info["global_step"] = obj["global_step"]
depth = 0
while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and depth < 4:
    if info["global_step"] is None and isinstance(obj.get("global_step"), int):
        info["global_step"] = obj["global_step"]
    obj = obj["state_dict"]
    depth += 1
if not isinstance(obj, dict):
    fail("notstate", "the pickle holds a " + type(obj).__name__ + ", not a dict of tensors")
tensors, seen = {}, {}
for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, torch.Tensor):
        info["skipped"].append(str(k))
        continue
    if v.layout != torch.strided or v.is_quantized:
        info["skipped"].append(str(k))
        continue
    v = v.detach()
    key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
    if key in seen or not v.is_contiguous():
        v = v.contiguous().clone()
    else:
        seen[key] = k
    tensors[k] = v
if not tensors:
    fail("notstate", "the pickle holds no tensors")
meta = {"format": "pt"}
if info["global_step"] is not None:
    meta["global_step"] = str(info["global_step"])
save_file(tensors, dst, metadata=meta)
sys.stdout.write("CPUFLOW-CHILD-OK " + json.dumps(info) + "\n")
'''


def _read_pickle_in_child(p: Path, fmt: str, progress: Callable[[str], Any] | None) -> WeightsFile:
    tmpdir = Path(tempfile.mkdtemp(prefix="cpuflow-unpickle-"))
    dst = tmpdir / "weights.safetensors"
    try:
        if progress:
            progress(f"reading pickle checkpoint {p.name} in a separate process (torch.load weights_only=True)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        try:
            res = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD, str(p.resolve()), str(dst), "1" if fmt == PICKLE_ZIP else "0"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=str(tmpdir), env=env,
                timeout=PICKLE_CHILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise SourceError(f"reading {p} took longer than {PICKLE_CHILD_TIMEOUT_S:.0f} s; convert it to safetensors")
        info: dict = {}
        for line in res.stdout.splitlines():
            if line.startswith("CPUFLOW-CHILD-OK "):
                info = json.loads(line[len("CPUFLOW-CHILD-OK "):])
        if res.returncode != 0 or not dst.exists():
            err = {"kind": "crash", "message": (res.stderr.strip().splitlines() or ["(no message)"])[-1][:500]}
            for line in res.stderr.splitlines():
                if line.startswith("CPUFLOW-CHILD-ERROR "):
                    err = json.loads(line[len("CPUFLOW-CHILD-ERROR "):])
            kind, msg = err.get("kind"), err.get("message", "")
            if kind == "unsafe":
                raise UnsafeFileError(
                    f"refusing {p}: the pickle holds Python objects other than tensors "
                    f"(torch.load weights_only=True rejected it: {msg}); nothing from it was run",
                    hint="convert it to .safetensors with a tool you trust, or use another copy of the model")
            if kind == "missing":
                raise MissingDependency(f"reading {p} needs torch and safetensors in {sys.executable}: {msg}")
            if kind == "notstate":
                raise _not_a_checkpoint(p, msg)
            if kind == "crash" and res.returncode < 0:
                msg = f"the reader process died with signal {-res.returncode}"
            raise _not_a_checkpoint(p, f"torch could not read it (truncated or corrupted?): {msg}")
        sd, metadata = _read_safetensors(dst)
        gs = info.get("global_step")
        return WeightsFile(p, fmt, sd, metadata, gs if isinstance(gs, int) else None, list(info.get("skipped", [])))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False,
                    progress: Callable[[str], Any] | None = None) -> WeightsFile:
    """Read every tensor of a weights file, safely. See the module docstring."""
    p = Path(path)
    fmt = sniff(p)
    suffix = p.suffix.lower()
    if fmt == SAFETENSORS:
        if progress:
            progress(f"reading checkpoint {p.name}")
        sd, metadata = _read_safetensors(p)
        return WeightsFile(p, fmt, sd, metadata)
    # A pickle container.
    if suffix == ".safetensors":
        raise UnsafeFileError(
            f"{p} is not a safetensors file (it is a pickle{' in a zip' if fmt == PICKLE_ZIP else ''}); "
            "it was not loaded",
            hint="a file named .safetensors must contain safetensors; get a real safetensors copy")
    if not allow_pickle:
        raise UnsafeFileError(f"{p} is a pickle checkpoint, which can run code when loaded; refused",
                              hint=ALLOW_PICKLE_HINT)
    wf = _read_pickle_in_child(p, fmt, progress)
    return wf


def unwrap_state_dict(sd: dict) -> dict:
    """A state dict nested under "state_dict" (Lightning checkpoints) -> the inner one."""
    depth = 0
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) and depth < 4:
        sd = sd["state_dict"]
        depth += 1
    return sd
