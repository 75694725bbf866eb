"""Compiled backend sessions, capped: least recently used first out, by bytes.

Every new (component, batch, width, height) compiles one more session (on
OpenVINO a compiled SD 1.5 UNet is GBs), so a long-running ``cpuflow serve``
whose users try sizes and guidance <= 1 (batch 1 instead of 2) would grow
without bound. A session's size is what the process's resident memory grew by
while it was loaded and during its first run (where backends allocate their
activation memory), and at least its model files' size (a compiled model holds
its weights); when a new session would take the total over the cap, the least
recently used ones are closed first. The session just loaded is never evicted,
so one run always has what it needs even under a tiny cap.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

from ..errors import CpuflowError
from ..memory import rss_bytes


def release_free_memory() -> None:
    """Hand freed heap back to the system (glibc's ``malloc_trim``): without it a
    closed session's pages stay in the process and RSS keeps growing (measured on
    the tiny UNet: 72 -> 149 MiB over 12 sizes under a 40 MB cap, ORT)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_cap_bytes() -> int:
    """Half the machine's physical memory (8 GiB where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def files_bytes(model_file: Path) -> int:
    """The model file plus its weights beside it (``.bin`` for OpenVINO IR, ``*_data`` / ``.data`` for ONNX)."""
    p = Path(model_file)
    total = 0
    for f in {p, p.with_suffix(".bin"), p.with_name(p.name + "_data"), p.with_suffix(".onnx_data"),
              p.with_suffix(".onnx.data")}:
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


@dataclass
class Entry:
    session: Any
    nbytes: int
    ran: bool = False


class SessionCache:
    """An LRU map key -> session, at most ``cap_bytes`` in total (see the module docstring)."""

    def __init__(self, cap_bytes: int | None = None):
        self.cap_bytes = int(cap_bytes) if cap_bytes is not None else default_cap_bytes()
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self.evictions = 0

    def get(self, key: Hashable) -> Any | None:
        e = self._entries.get(key)
        if e is None:
            return None
        self._entries.move_to_end(key)
        return e.session

    def load(self, key: Hashable, loader: Callable[[], Any], model_file: Path) -> Any:
        """``loader()``'s session, measured and stored; older sessions go first when over the cap."""
        before = rss_bytes()
        sess = loader()
        after = rss_bytes()
        grown = (after - before) if (before is not None and after is not None) else 0
        nbytes = max(grown, files_bytes(model_file))
        self._entries[key] = Entry(sess, nbytes)
        self._entries.move_to_end(key)
        self._evict()
        return sess

    def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a run of the session under ``key``); the first run's memory growth
        is added to the session's size."""
        e = self._entries.get(key)
        if e is None or e.ran:
            return fn()
        before = rss_bytes()
        out = fn()
        after = rss_bytes()
        e.ran = True
        if before is not None and after is not None and after > before:
            e.nbytes += after - before
            self._evict()
        return out

    def _evict(self) -> None:
        """Close least recently used sessions until the total fits (the newest always stays)."""
        closed = False
        while self.total_bytes > self.cap_bytes and len(self._entries) > 1:
            old_key = next(iter(self._entries))
            self._close(self._entries.pop(old_key).session)
            self.evictions += 1
            closed = True
        if closed:
            release_free_memory()

    def drop(self, predicate: Callable[[Hashable], bool]) -> None:
        """Close and forget the sessions whose key matches."""
        for key in [k for k in self._entries if predicate(k)]:
            self._close(self._entries.pop(key).session)

    @staticmethod
    def _close(sess: Any) -> None:
        try:
            sess.close()
        except CpuflowError:
            pass

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        return ((k, e.session) for k, e in self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
