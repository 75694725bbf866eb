"""What verifying a model folder by content costs at start (issue 17 item 1).

For a folder, three timings of the file checks `LoadedModel` does before any
backend session exists (median of --repeat runs each):

* size only (``verify="size"``, the old default),
* first start: sha256 of every file, remembered in an empty digest memo,
* later start: the memo read back, every file only stat()ed.

    .venv/bin/python bench/verify_cost.py                      # the shipped model
    .venv/bin/python bench/verify_cost.py --pad-gib 3.2        # + a 3.2 GiB file (SD 1.5's fp32 UNet size)
    .venv/bin/python bench/verify_cost.py exported/sd15

--pad-gib copies the shipped model into a temporary folder and adds one file of
random bytes of that size, recorded in its manifest, so a big folder can be
measured without exporting one. The page cache is not dropped: the first start
reads files that are probably still cached (a cold disk adds its read time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpuflow.file_digests import DigestMemo  # noqa: E402
from cpuflow.manifest import MANIFEST_NAME, file_record, load_manifest  # noqa: E402
from cpuflow.pipelines.model import shipped_model_dir  # noqa: E402


def padded_copy(dst: Path, gib: float) -> Path:
    shutil.copytree(shipped_model_dir(), dst)
    pad = dst / "unet" / "padding.bin"
    left = int(gib * 2**30)
    with open(pad, "wb") as f:
        while left > 0:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    data = json.loads((dst / MANIFEST_NAME).read_text())
    data["files"]["unet/padding.bin"] = file_record(dst, "unet/padding.bin")
    (dst / MANIFEST_NAME).write_text(json.dumps(data, indent=1))
    return dst


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(folder: Path, repeat: int) -> dict:
    sizes, firsts, laters = [], [], []
    for _ in range(repeat):
        sizes.append(timed(lambda: load_manifest(folder, verify="size")))
        with tempfile.TemporaryDirectory() as cache:
            memo_path = Path(cache) / "verified-files.json"
            firsts.append(timed(lambda: load_manifest(folder, verify="sha256", digests=DigestMemo(memo_path))))
            laters.append(timed(lambda: load_manifest(folder, verify="sha256", digests=DigestMemo(memo_path))))
    m = load_manifest(folder, verify="size")
    total = sum(int(v["size"]) for v in m.files.values())
    return {"folder": str(folder), "files": len(m.files), "bytes": total,
            "size_only_s": statistics.median(sizes), "first_start_s": statistics.median(firsts),
            "later_start_s": statistics.median(laters)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=None)
    ap.add_argument("--pad-gib", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = padded_copy(Path(tmp) / "m", a.pad_gib) if a.pad_gib else (a.folder or shipped_model_dir())
        r = measure(folder, a.repeat)
    print(json.dumps(r))
    print(f"{r['files']} files, {r['bytes'] / 2**30:.2f} GiB: size only {r['size_only_s'] * 1000:.1f} ms, "
          f"first start (sha256) {r['first_start_s']:.2f} s, later start {r['later_start_s'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
