"""Image comparison for the parity tests (shared, so every test measures dB the same way)."""
from __future__ import annotations

import numpy as np


def psnr(a, b, peak: float = 255.0) -> float:
    """PSNR in dB of two images / arrays (PIL images or arrays; infinite when equal)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))
