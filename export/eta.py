"""Progress of one long export step, with the time it has left.

The export's own reporter (build.py ``ConsoleProgress``) counts whole steps; a
quantization step of the full SD 1.5 UNet is minutes of UNet calls inside one
of them, often in a spawned child process that cannot reach the parent's
callback. ``Eta`` counts the units of such a step (calibration prompts, UNet
inputs of a statistics pass) and reports elapsed and remaining time: a tqdm
bar when the stream is a terminal, else one line per unit (a log file gets no
wall of carriage returns). The estimate is the mean time of the units done so
far times the units left, so the first unit (which also compiles the model)
makes it pessimistic at first.
"""
from __future__ import annotations

import sys
import time
from typing import Callable


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


class Eta:
    """``with Eta("[unet] calibration capture", total=8, unit="prompt") as eta: ... eta.update()``."""

    def __init__(self, label: str, total: int, *, unit: str = "", emit: Callable[[str], None] | None = None,
                 stream=None, bar: bool | None = None):
        self.label = label
        self.total = int(total)
        self.unit = unit
        self.done = 0
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.emit = emit
        use_bar = bar if bar is not None else (emit is None and bool(getattr(self.stream, "isatty", bool)()))
        self.bar = None
        if use_bar and self.total:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, file=self.stream, desc=label, unit=unit or "it", leave=False,
                            bar_format="{desc}: {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def left(self) -> float | None:
        """Seconds left at the mean pace so far (None before the first unit)."""
        if not self.done:
            return None
        return (time.perf_counter() - self.t0) / self.done * max(self.total - self.done, 0)

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.t0
        left = self.left()
        unit = f" {self.unit}s" if self.unit else ""
        when = f"{_clock(elapsed)} elapsed" + ("" if left is None else f", about {_clock(left)} left")
        return f"{self.label}: {self.done}/{self.total}{unit}{note}, {when}"

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        text = self.line(f" ({note})" if note else "")
        if self.emit is not None:
            self.emit(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Eta":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
