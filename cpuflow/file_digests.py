"""Remembered sha256 digests: verify a model folder's content without hashing
gigabytes at every start.

A file's digest is remembered under its identity ``(device, inode, size,
mtime_ns, ctime_ns)``. Any write to the file changes its mtime and ctime (and
ctime cannot be set back from user space, unlike mtime), so a file whose
identity is unchanged still has the bytes that were hashed; a changed one is
hashed again. The memo holds the file's *actual* digest, not a verdict: the
caller compares it with what the manifest (or a blob record) expects, so a
wrong sha256 written into ``cpuflow.json`` is caught as well as a flipped byte.

The memo is one small JSON file in the private cache folder (mode 0700, see
:mod:`cpuflow.backends.cache`), so no other user can plant digests in it. Two
processes writing it at once may lose each other's new entries: that only
costs a re-hash later, never a wrong answer. When the folder cannot be
written, every file is simply hashed every time.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

MEMO_NAME = "verified-files.json"
MAX_ENTRIES = 20_000          # ~2 MB of JSON; the least recently used entries go first
_VERSION = 1


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class DigestMemo:
    """``sha256(path)`` that hashes a file once per identity. ``path=None``: remembers nothing."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, list] = {}
        self._dirty = False
        self.hashed = 0              # files hashed by this memo (tests and the bench read it)
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("version") == _VERSION \
                        and isinstance(data.get("entries"), dict):
                    self._entries = {k: v for k, v in data["entries"].items()
                                     if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}
            except (OSError, ValueError):
                pass                 # absent or damaged: start empty (it is only a memo)

    @classmethod
    def in_cache(cls, cache_root: str | os.PathLike | None = None) -> "DigestMemo":
        """The memo in the private cache folder (``None``: the default one);
        one that remembers nothing when that folder cannot be made."""
        from .backends.cache import default_cache_dir, ensure_private_dir
        from .errors import CpuflowError
        try:
            root = ensure_private_dir(cache_root if cache_root is not None else default_cache_dir())
        except (CpuflowError, OSError):
            return cls(None)
        return cls(root / MEMO_NAME)

    def sha256(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        key = identity(st)
        hit = self._entries.get(key)
        if hit is not None:
            if time.time() - hit[1] > 3600:   # last use, for pruning; not rewritten at every start
                hit[1] = time.time()
                self._dirty = True
            return hit[0]
        digest = sha256_file(path)
        self.hashed += 1
        # Remember it only if the file did not change while it was read.
        if identity(os.stat(path)) == key:
            self._entries[key] = [digest, time.time()]
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the memo back (atomically); failures are ignored."""
        if self.path is None or not self._dirty:
            return
        entries = self._entries
        if len(entries) > MAX_ENTRIES:
            keep = sorted(entries.items(), key=lambda kv: kv[1][1])[-MAX_ENTRIES:]
            entries = dict(keep)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": _VERSION, "entries": entries}, f, separators=(",", ":"))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
