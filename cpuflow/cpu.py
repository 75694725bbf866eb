"""What this CPU can do: instruction-set features and core counts (no torch).

Read from ``/proc/cpuinfo`` on Linux; elsewhere (or when it says little) from
``platform``/``os`` and OpenVINO's ``OPTIMIZATION_CAPABILITIES``. Used by
``cpuflow info`` and ``cpuflow bench`` to explain the numbers (bf16 runs fast
only with AMX or AVX512-BF16; int8 needs VNNI to pay off).
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

CPUINFO = "/proc/cpuinfo"

# /proc/cpuinfo flag -> our key
_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx_tile",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
    "amx_fp16": "amx_fp16",
}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name, vendor, flags and core counts from ``/proc/cpuinfo`` text.

    ``physical_cores`` counts distinct (physical id, core id) pairs; when the
    kernel (some VMs, containers, ARM) omits them, ``cpu cores`` x sockets, and
    None when even that is missing."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    procs: list[dict[str, str]] = []
    for b in blocks:
        d: dict[str, str] = {}
        for line in b.splitlines():
            if ":" in line:
                k, _, v = line.partition(":")
                d[k.strip().lower()] = v.strip()
        if "processor" in d:
            procs.append(d)
    out: dict[str, Any] = {"model_name": None, "vendor": None, "flags": set(),
                           "logical_cores": len(procs) or None, "physical_cores": None}
    if not procs:
        return out
    first = procs[0]
    out["model_name"] = first.get("model name") or first.get("cpu model") or first.get("hardware")
    out["vendor"] = first.get("vendor_id") or first.get("cpu implementer")
    out["flags"] = set((first.get("flags") or first.get("features") or "").split())
    pairs = {(p.get("physical id"), p.get("core id")) for p in procs if "core id" in p}
    if pairs:
        out["physical_cores"] = len(pairs)
    elif "cpu cores" in first:
        try:
            sockets = len({p.get("physical id") for p in procs}) or 1
            out["physical_cores"] = int(first["cpu cores"]) * sockets
        except ValueError:
            pass
    return out


def _openvino_caps() -> tuple[set[str], str | None]:
    try:
        import openvino as ov
        core = ov.Core()
        caps = {str(c).upper() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}
        name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
        return caps, name
    except Exception:  # openvino missing or the CPU plugin failed: features stay from cpuinfo
        return set(), None


def usable_cores() -> int:
    """Logical CPUs this process may run on (affinity / cpuset aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_features(cpuinfo_text: str | None = None, *, use_openvino: bool = True) -> dict[str, Any]:
    """A flat dict describing the CPU::

        model_name, vendor, machine, logical_cores, usable_cores, physical_cores,
        avx2, fma, avx512f, avx512bw, avx512_vnni, avx_vnni, avx512_bf16, avx512_fp16,
        amx_tile, amx_bf16, amx_int8, amx_fp16,
        vnni (any VNNI), bf16 (native bf16 math: AVX512-BF16 or AMX-BF16, or
        OpenVINO says BF16), amx (AMX-BF16 or AMX-INT8), openvino_caps, source

    ``cpuinfo_text`` replaces ``/proc/cpuinfo`` (for tests); ``use_openvino``
    False skips asking OpenVINO.
    """
    source = "cpuinfo"
    if cpuinfo_text is None:
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    info = parse_cpuinfo(cpuinfo_text)
    flags: set[str] = info["flags"]
    feats: dict[str, Any] = {k: (f in flags) for f, k in _FLAGS.items()}
    caps, ov_name = _openvino_caps() if use_openvino else (set(), None)
    if not flags:
        source = "openvino" if caps else "platform"
    model = info["model_name"] or ov_name or platform.processor() or None
    logical = info["logical_cores"] or os.cpu_count() or 1
    physical = info["physical_cores"] or logical
    feats.update(
        model_name=model,
        vendor=info["vendor"],
        machine=platform.machine(),
        logical_cores=logical,
        usable_cores=usable_cores(),
        physical_cores=physical,
        vnni=feats["avx512_vnni"] or feats["avx_vnni"],
        amx=feats["amx_bf16"] or feats["amx_int8"],
        bf16=feats["avx512_bf16"] or feats["amx_bf16"] or "BF16" in caps,
        openvino_caps=sorted(caps),
        source=source,
    )
    return feats


@lru_cache(maxsize=1)
def _cached_features() -> dict[str, Any]:
    return cpu_features(use_openvino=False)


def int8_dot_products_exact(features: dict[str, Any] | None = None) -> bool:
    """Whether this CPU's int8 kernels sum u8 x s8 products exactly: VNNI (AVX512-VNNI or
    AVX-VNNI) or AMX-INT8. Without them (AVX2 only, or AVX-512 without VNNI: most laptops
    before 2021), oneDNN's and ONNX Runtime's u8 x s8 kernels use pmaddubsw, whose 16-bit sums
    of two products saturate. The shipped model's full int8 variant, which keeps the judge
    within 1.4 points where the sums are exact, loses 9.8 points there (bench/README.md,
    "int8 without VNNI")."""
    f = features or _cached_features()
    return bool(f.get("vnni") or f.get("amx_int8"))


def physical_cores() -> int:
    """Physical cores of the machine (hyper-threads not counted)."""
    return int(_cached_features()["physical_cores"])


def default_threads() -> int:
    """A sensible thread count: physical cores, but no more than this process may use."""
    f = _cached_features()
    return max(1, min(int(f["physical_cores"]), int(f["usable_cores"])))


def describe(features: dict[str, Any] | None = None) -> str:
    """One line for ``cpuflow info``: model, cores and the features that matter."""
    f = features or cpu_features()
    isa = [k for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f.get(k)]
    return (f"{f.get('model_name') or 'unknown CPU'}: {f['physical_cores']} physical / {f['logical_cores']} logical cores"
            f" ({f['usable_cores']} usable); {' '.join(isa) or 'no AVX2'}; bf16 {'yes' if f['bf16'] else 'no'}")
