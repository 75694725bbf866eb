"""Image comparison for the parity tests (shared, so every test measures dB the same way)."""
from __future__ import annotations

import numpy as np


def psnr(a, b, peak: float = 255.0) -> float:
    """PSNR in dB of two images / arrays (PIL images or arrays; infinite when equal)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def texture(seed: int, size: int = 512):
    """A natural-ish RGB test picture (PIL): colour noise with a 1/f^beta spectrum
    (beta 0.8..2.2, the range of photographs), correlated channels, a random mean
    colour and contrast; every third seed has such contrast that a fifth or more of
    its pixels clip at 0 or 255. Used by the watermark tests and
    bench/watermark_robustness.py."""
    from PIL import Image

    r = np.random.default_rng(seed)
    beta = r.uniform(0.8, 2.2)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    mix = r.normal(size=(3, 3)) * 0.5 + np.eye(3)
    planes = []
    for _ in range(3):
        spec = (r.normal(size=(size, size)) + 1j * r.normal(size=(size, size))) / f ** beta
        x = np.real(np.fft.ifft2(spec))
        planes.append((x - x.mean()) / x.std())
    x = np.einsum("ij,jhw->hwi", mix, np.stack(planes))
    contrast = r.uniform(90, 160) if seed % 3 == 2 else r.uniform(15, 55)
    x = x * contrast + r.uniform(40, 215, 3)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
