"""The compiled-model cache: where OpenVINO keeps compiled blobs between runs.

Layout::

    <cache root>/                       mode 0700, e.g. ~/.cache/cpuflow
        openvino/
            <key>-<hash16>/             one compiled model (mode 0700)
                cpuflow-cache.json      what it is for; its mtime = last use
                <n>.blob                written by OpenVINO (CACHE_DIR)

A subfolder's name hashes everything a compiled blob depends on (the weights'
cache key, the static dims, the precision, the OpenVINO version, the CPU), so
a change to any of them compiles afresh instead of loading a stale blob.
:func:`prune` keeps the cache under a size cap by deleting the least recently
used subfolders, and only folders that carry our marker file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

import platformdirs

from ..errors import InvalidArgument

ENV_CACHE_DIR = "CPUFLOW_CACHE_DIR"
MARKER = "cpuflow-cache.json"
DEFAULT_MAX_BYTES = 16 * 1024 ** 3  # a few SD1/SD2 UNets with their VAEs and text encoders
_MAX_DEPTH = 3


def default_cache_dir() -> Path:
    """``$CPUFLOW_CACHE_DIR``, else the platform's user cache folder for cpuflow
    (platformdirs: ``$XDG_CACHE_HOME/cpuflow`` or ``~/.cache/cpuflow`` on Linux,
    ``~/Library/Caches/cpuflow`` on macOS, ``%LOCALAPPDATA%\\cpuflow\\Cache`` on
    Windows). Not created here; see :func:`ensure_private_dir`."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("cpuflow", appauthor=False))


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) with mode 0700; if it exists, is ours and is
    open to group/others, tighten it to 0700. A folder owned by another user is
    refused: compiled blobs from it would be loaded and run."""
    p = Path(path).expanduser()
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot create the cache folder {p} ({e.strerror or e})",
                              hint="set CPUFLOW_CACHE_DIR or --cache-dir to a writable folder") from None
    if not p.is_dir():
        raise InvalidArgument(f"cache path {p} exists and is not a folder")
    if os.name != "posix":
        return p
    st = os.stat(p)
    if st.st_uid != os.getuid():
        raise InvalidArgument(f"cache folder {p} belongs to another user (uid {st.st_uid})",
                              hint="set CPUFLOW_CACHE_DIR or --cache-dir to a folder you own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(p, 0o700)
    return p


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return (s[:limit] or "model")


def cache_key_hash(cache_key: str, *, static_dims: Mapping[str, int] | None, precision: str,
                   runtime_version: str, device: str = "CPU", extra: Mapping[str, object] | None = None) -> str:
    """16 hex digits over everything a compiled blob depends on."""
    payload = {
        "key": cache_key,
        "dims": None if static_dims is None else {str(k): int(v) for k, v in sorted(static_dims.items())},
        "precision": precision,
        "runtime": runtime_version,
        "device": device,
        "extra": dict(extra or {}),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def cpu_identity() -> dict[str, object]:
    """What of the CPU a compiled or optimised model depends on (the kernels and
    blocked layouts a runtime picks differ with AMX / AVX-512 / bf16): part of
    every cache key, so a cache folder copied to another machine is not reused. Read
    once per process: every session load asks for it."""
    try:
        from ..cpu import cpu_features
        f = cpu_features(use_openvino=False)
        return {"model": f.get("model_name"), "amx": f.get("amx"), "bf16": f.get("bf16"),
                "avx512f": f.get("avx512f")}
    except Exception:  # noqa: BLE001 - the cache key just gets coarser
        return {}


def model_cache_dir(cache_root: str | os.PathLike, cache_key: str, *,
                    static_dims: Mapping[str, int] | None, precision: str, runtime_version: str,
                    backend: str = "openvino", device: str = "CPU",
                    extra: Mapping[str, object] | None = None) -> Path:
    """The per-model compiled-cache subfolder (created 0700, marked, touched)."""
    h = cache_key_hash(cache_key, static_dims=static_dims, precision=precision,
                       runtime_version=runtime_version, device=device, extra=extra)
    root = ensure_private_dir(cache_root)
    ensure_private_dir(root / backend)
    sub = ensure_private_dir(root / backend / f"{_slug(cache_key)}-{h}")
    marker = sub / MARKER
    if not marker.exists():
        meta = {"cache_key": cache_key, "static_dims": dict(static_dims) if static_dims else None,
                "precision": precision, "runtime_version": runtime_version, "backend": backend,
                "device": device, "extra": dict(extra or {}), "created": time.time()}
        # Several processes (Ray actors on one node, two servers) may open the
        # same model at once: each writes its own temporary file, and the
        # last rename wins (the contents are the same). A marker that cannot
        # be written never fails a load; the cache is an optimisation.
        tmp = sub / f"{MARKER}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
            os.replace(tmp, marker)
        except OSError:
            tmp.unlink(missing_ok=True)
    touch(sub)
    return sub


# A compiled blob is about the size of the model's weights (bf16 blobs about
# half of an fp32 .bin): a new one is written only if this much stays free after it.
MIN_FREE_AFTER_BYTES = 2 * 1024 ** 3


def disk_free(path: str | os.PathLike) -> int:
    """Free bytes on the disk holding ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def room_for_blob(cache_root: str | os.PathLike, weights_bytes: int,
                  free_bytes: Callable[[Path], int] | None = None) -> tuple[bool, int]:
    """(whether new compiled blobs of models with ``weights_bytes`` of weights in
    all fit the cache's disk with MIN_FREE_AFTER_BYTES to spare, the free bytes).
    ``free_bytes`` replaces :func:`disk_free` (tests)."""
    try:
        free = int((free_bytes or disk_free)(Path(cache_root)))
    except OSError:
        return True, -1   # unknown: let OpenVINO try (a failed cache write never fails a load)
    return free >= weights_bytes + MIN_FREE_AFTER_BYTES, free


def touch(folder: str | os.PathLike) -> None:
    """Record a use of a cache subfolder (the marker's mtime is its last use)."""
    marker = Path(folder) / MARKER
    try:
        os.utime(marker)
    except FileNotFoundError:
        try:
            marker.write_text("{}", encoding="utf-8")
        except OSError:
            pass   # a pruner removed the folder meanwhile: the next load re-creates it
    except OSError:
        pass


def last_used(folder: str | os.PathLike) -> float:
    p = Path(folder)
    try:
        return (p / MARKER).stat().st_mtime
    except OSError:
        return p.stat().st_mtime


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes in regular files under ``folder`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def cache_entries(cache_root: str | os.PathLike) -> list[Path]:
    """Every marked cache subfolder under ``cache_root`` (a few levels deep)."""
    root = Path(cache_root)
    out: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            children = list(os.scandir(d))
        except OSError:
            return
        for e in children:
            if not e.is_dir(follow_symlinks=False):
                continue
            p = Path(e.path)
            if (p / MARKER).is_file():
                out.append(p)
            elif depth < _MAX_DEPTH:
                walk(p, depth + 1)

    if root.is_dir():
        walk(root, 1)
    return out


def cache_size(cache_root: str | os.PathLike) -> int:
    return sum(folder_size(p) for p in cache_entries(cache_root))


def prune(cache_root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, *,
          keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Delete least-recently-used cache subfolders until the marked entries
    under ``cache_root`` total at most ``max_bytes``. Folders in ``keep`` (the
    ones in use now) are never deleted. Returns the deleted folders, oldest first."""
    keep_real = {os.path.realpath(k) for k in keep}
    entries = [(last_used(p), folder_size(p), p) for p in cache_entries(cache_root)]
    total = sum(size for _t, size, _p in entries)
    removed: list[Path] = []
    for _t, size, p in sorted(entries, key=lambda x: x[0]):
        if total <= max_bytes:
            break
        if os.path.realpath(p) in keep_real:
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            total -= size
            removed.append(p)
    return removed
