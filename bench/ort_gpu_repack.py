"""Repack onnxruntime-gpu for a machine that can only receive small transfers (bench/cuda_check.sh).

The onnxruntime-gpu 1.31.1 wheel is 256 MB, and most of it is the CUDA provider library's fatbin: SASS
for sm_75, 80, 86, 89, 90 and 120. A GPU runs only the entries of its own architecture, so this
zeroes the payload of every other ELF entry. The fatbin and entry headers are kept, so the CUDA
driver still finds its own entry. The zeros then compress to nothing. It was used for an H200
(sm_90) in bench/README.md, "CUDA execution provider". A user installs the wheel unchanged.

    python bench/ort_gpu_repack.py stat  onnxruntime/capi/libonnxruntime_providers_cuda.so
    python bench/ort_gpu_repack.py keep 90 onnxruntime/capi/libonnxruntime_providers_cuda.so OUT.so

The full recipe, in an empty folder:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1
    unzip -q onnxruntime_gpu-*.whl && python ort_gpu_repack.py keep 90 onnxruntime/capi/libonnxruntime_providers_cuda.so x.so
    mv x.so onnxruntime/capi/libonnxruntime_providers_cuda.so && rm -r onnxruntime/{transformers,tools,quantization}
    tar cf - onnxruntime onnxruntime_gpu-1.31.1.dist-info | xz -9 -T2 | split -b 25M -d -a 1 - ort.tar.xz.part-

Fatbin layout, as read here: a container header (magic 0xBA55ED50, u16 version, u16 header size,
u64 size of the entries), then the entries. Each entry has u16 kind (2 = ELF, 1 = PTX), u16
version, u32 header size, u64 padded payload size, and at offset 28 u32 sm, followed by the
payload.
"""
from __future__ import annotations

import collections
import struct
import subprocess
import sys

MAGIC = 0xBA55ED50


def fatbin_section(path: str) -> tuple[int, int]:
    """(file offset, size) of the ``.nv_fatbin`` section (readelf)."""
    out = subprocess.check_output(["readelf", "-S", "-W", path], text=True)
    for line in out.splitlines():
        parts = line.replace("[ ", "[").split()
        if ".nv_fatbin" in parts:
            i = parts.index(".nv_fatbin")
            return int(parts[i + 3], 16), int(parts[i + 4], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section")


def entries(buf, off: int, size: int):
    """(offset, kind, header size, padded payload size, sm) of every fatbin entry."""
    p, end = off, off + size
    while p < end:
        magic, _ver, hsz, fsz = struct.unpack_from("<IHHQ", buf, p)
        if magic != MAGIC:
            p += 8    # alignment padding between containers
            continue
        q, qend = p + hsz, p + hsz + fsz
        while q < qend:
            kind, _ev, ehsz, padded = struct.unpack_from("<HHIQ", buf, q)
            sm = struct.unpack_from("<I", buf, q + 28)[0]
            yield q, kind, ehsz, padded, sm
            q += ehsz + padded
        p = qend


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("stat", "keep"):
        print(__doc__)
        return 2
    keep = int(argv[1]) if argv[0] == "keep" else None
    path = argv[2] if keep is not None else argv[1]
    data = bytearray(open(path, "rb").read())
    off, size = fatbin_section(path)
    count, mib = collections.Counter(), collections.Counter()
    zeroed = 0
    for q, kind, ehsz, padded, sm in entries(data, off, size):
        count[(kind, sm)] += 1
        mib[(kind, sm)] += padded
        if keep is not None and not (kind == 2 and sm == keep):
            data[q + ehsz:q + ehsz + padded] = bytes(padded)
            zeroed += padded
    for k in sorted(count):
        print(f"kind {k[0]} sm_{k[1]}: {count[k]} entries, {mib[k] / 2 ** 20:.0f} MiB")
    if keep is not None:
        open(argv[3], "wb").write(data)
        print(f"zeroed {zeroed / 2 ** 20:.0f} MiB; kept the ELF entries of sm_{keep}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
