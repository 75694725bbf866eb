"""Time per 512x512 image of cpuflow's watermark on a quiet machine (issue #12's 30 ms target).

Three random 512x512 RGB images, 30 calls each of ``watermark.apply`` (both marks) and
``watermark.detect``; the first 3 calls are dropped as warm-up; prints best and median.
Run it with nothing else on the machine: ``python bench/watermark_time.py``.
"""
import os
import time

import numpy as np
from PIL import Image

from cpuflow import watermark


def main() -> None:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(3)]
    for name, fn in (("apply (both marks)", watermark.apply), ("detect", watermark.detect)):
        ts = []
        for i in range(30):
            t = time.perf_counter()
            fn(imgs[i % 3])
            ts.append((time.perf_counter() - t) * 1000)
        ts = sorted(ts[3:])
        print(f"{name}: best {ts[0]:.1f} ms, median {ts[len(ts) // 2]:.1f} ms")
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
