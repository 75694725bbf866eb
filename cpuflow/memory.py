"""This process's memory, as the operating system counts it (the session cap and the bench read it)."""
from __future__ import annotations

import sys


def rss_bytes() -> int | None:
    """This process's resident set size (``VmRSS``; None where /proc is missing)."""
    return memory_status()["rss"]


def memory_status() -> dict[str, int | None]:
    """This process's current and peak resident set size in bytes
    (``VmRSS``/``VmHWM`` from /proc/self/status; ``ru_maxrss`` elsewhere)."""
    out: dict[str, int | None] = {"rss": None, "hwm": None}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss" if key == "VmRSS" else "hwm"] = int(val.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if out["hwm"] is None:
        try:
            import resource
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["hwm"] = int(r) if sys.platform == "darwin" else int(r) * 1024  # macOS: bytes, Linux: KiB
        except (ImportError, OSError):
            pass
    return out
