"""Give back the resident pages of memory-mapped weight files while OpenVINO uses them.

Used by the export (NNCF's statistics model, the OpenVINO parity and int8 validation runs)
and by the runtime under ``--low-memory`` (backends/openvino_backend.py: the IR's .bin or the
cached blob imported in place, while compile / import and the first call pack the weights).
Standard library only (ctypes), like the rest of the runtime.

OpenVINO reads an IR's ``.bin`` through ``mmap`` (``ENABLE_MMAP``, on by default)
and the CPU plugin keeps that mapping for the compiled model's life, but on the
first inference it packs every Convolution / MatMul weight into its own blocked
copy (anonymous memory) and then reads the packed copy only. So once the SD 1.5
UNet (3.4 GB) has run, the process holds it twice: 3.4 GB of file pages that are
never read again and 3.0 GB of packed weights (measured, f32 hint: VmRSS 7.55 GB,
RssFile 3.42 GB, RssAnon 4.13 GB after one 512x512 call). The same holds in
NNCF's statistics passes, which compile copies of the model read from the file.

The file pages are clean, so the kernel could reclaim them, yet until it does
they count in the process's resident set (RSS, what ``time -v``, the task manager
and the issue's 8 GB target measure) and push the kernel to evict other caches
first. :func:`dropping_mapped_pages` asks the kernel to page them out
(``madvise(MADV_PAGEOUT)``, Linux >= 5.4) now and every ``interval`` seconds
while the block runs: a page read again is faulted back in from the file (or the
page cache), so the numbers computed are the same; only the resident set shrinks.

MADV_PAGEOUT, not MADV_DONTNEED: DONTNEED discards anonymous pages, so if the
mapping were unmapped and its addresses reused for heap memory between reading
``/proc/self/maps`` and the call, it would zero live data; PAGEOUT never loses
data (an anonymous page is swapped out or left alone). Elsewhere than Linux, or
on an older kernel (EINVAL), it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

MADV_PAGEOUT = 21  # linux/mman-common.h


def mapped_ranges(paths: Iterable[str | os.PathLike]) -> list[tuple[int, int]]:
    """(start, end) address ranges where this process maps any of ``paths``."""
    wanted = {os.path.realpath(p) for p in paths}
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def page_out(paths: Iterable[str | os.PathLike]) -> int:
    """Ask the kernel to page out this process's mappings of ``paths`` now;
    returns the bytes of address space advised (0 where not supported)."""
    if not sys.platform.startswith("linux"):
        return 0
    madvise = _madvise()
    if madvise is None:
        return 0
    done = 0
    for lo, hi in mapped_ranges(paths):
        if madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            done += hi - lo
    return done


@contextmanager
def dropping_mapped_pages(paths: Iterable[str | os.PathLike], interval: float = 0.5) -> Iterator[None]:
    """Page out the mappings of ``paths`` every ``interval`` seconds while the block
    runs (a daemon thread), and once more when it ends."""
    paths = [Path(p) for p in paths]
    if not sys.platform.startswith("linux") or not paths:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            page_out(paths)

    th = threading.Thread(target=loop, name="page-out", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        page_out(paths)
