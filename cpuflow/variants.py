"""Which variant of an exported model runs when the user names none.

The export measures every quantized file against fp32 and records the figures
in the manifest (``components.X.variants.V.parity[format]``, export/quantize.py):
the UNet's on a held-out sampling run against the fp32 export (real latents and
text embeddings) when calibration data existed, the other components' on seeded
parity inputs against torch fp32. A variant's fidelity is its worst component's
PSNR. The default is the fastest variant whose fidelity passes
:data:`MIN_FIDELITY_DB`, so a variant that measurably changes images (full int8
on the shipped model: 38.8 dB, 7-29 points of accuracy lost, bench/README.md) is
never picked just because it is faster.

Order of precedence: the variant the user asks for; the model's own choice
(``defaults.variant`` in the manifest); the fastest passing variant; fp32.
A folder whose quantized variants carry no figures (an older export) runs
fp32, the safe default, and says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .errors import ModelError

#: Fastest first (bench/README.md: OpenVINO int8 0.33x of an fp32 UNet call,
#: hybrid and int8-weights between); fp32 is always present.
SPEED_ORDER = ("int8", "hybrid", "int8-weights", "fp32")

#: The lowest worst-component PSNR (dB, against fp32) a variant may have to be
#: picked by default. On the shipped model (bench/README.md, 72 held-out prompts)
#: int8-weights measured 53.6 dB (OpenVINO) / 62.1 dB (ONNX Runtime) and kept the
#: fp32 accuracy within 1.4 points; full int8 measured 38.8 / 39.8 dB and lost
#: 7-29 / 0-12.5 points. 50 dB sits between the two.
MIN_FIDELITY_DB = 50.0

SAFE_DEFAULT = "fp32"


@dataclass(frozen=True)
class VariantChoice:
    name: str
    reason: str
    fidelity_db: Mapping[str, float | None] = field(default_factory=dict)  # variant -> worst PSNR (None: unknown)


def fidelity_db(manifest, variant: str, fmt: str) -> float | None:
    """The worst recorded PSNR (dB) against fp32 of ``variant``'s ``fmt`` files,
    over the components that have the variant; -inf when a file failed its gate;
    None when a figure is missing."""
    if variant == "fp32":
        return math.inf
    worst: float | None = None
    for comp in manifest.components.values():
        var = comp.variants.get(variant)
        if var is None or fmt not in var.files:
            continue  # this component runs its fp32 files: no loss
        entry = var.parity.get(fmt) if isinstance(var.parity, Mapping) else None
        if not isinstance(entry, Mapping):
            return None
        if entry.get("passed") is False:
            return -math.inf
        held = entry.get("held_out")
        figure = (held if isinstance(held, Mapping) else entry).get("psnr_db")
        if isinstance(figure, bool) or not isinstance(figure, (int, float)):
            return None
        worst = float(figure) if worst is None else min(worst, float(figure))
    return worst


def variants_in(manifest, fmt: str) -> list[str]:
    """Variants with files in ``fmt`` for at least one component, fastest first."""
    have = {v for c in manifest.components.values() for v, var in c.variants.items() if fmt in var.files}
    fast = [v for v in SPEED_ORDER[:-1] if v in have]
    return fast + sorted(have - set(SPEED_ORDER)) + (["fp32"] if "fp32" in have else [])


def _db(x: float | None) -> str:
    return "no figures" if x is None else ("failed its gate" if x == -math.inf else f"{x:.1f} dB")


def choose_variant(manifest, fmt: str, requested: str | None = None) -> VariantChoice:
    """The variant to run on ``fmt`` files and why (see the module docstring)."""
    all_v = sorted({v for c in manifest.components.values() for v in c.variants})
    if requested is not None:
        if requested not in all_v:
            raise ModelError(f"variant {requested!r} is not in this model (it has: {', '.join(all_v)})")
        return VariantChoice(requested, "asked for (--variant)")
    candidates = variants_in(manifest, fmt)
    figs = {v: fidelity_db(manifest, v, fmt) for v in candidates if v != "fp32"}
    own = manifest.raw.get("defaults", {}).get("variant")
    if own in candidates:
        return VariantChoice(own, "the model's own default (defaults.variant in its manifest)", figs)
    if not figs:
        return VariantChoice("fp32", "the only variant with files for this backend", figs)
    failed: list[str] = []   # faster variants that did not pass
    for v, f in figs.items():
        if f is None or f < MIN_FIDELITY_DB:
            failed.append(f"{v} {_db(f)}")
            continue
        why = f"; faster but not passing: {', '.join(failed)}" if failed else ""
        return VariantChoice(v, f"the fastest variant whose fidelity passes: {_db(f)} PSNR against fp32 "
                                    f"(worst component) >= {MIN_FIDELITY_DB:g} dB{why}", figs)
    if all(f is None for f in figs.values()):
        return VariantChoice(SAFE_DEFAULT, "the safe default: this export recorded no fidelity figures for "
                                           f"its quantized variants ({', '.join(figs)}); pass --variant to "
                                           "choose one", figs)
    listed = ", ".join(f"{v} {_db(f)}" for v, f in figs.items())
    return VariantChoice("fp32", f"no quantized variant passes {MIN_FIDELITY_DB:g} dB PSNR against fp32 "
                                 f"({listed})", figs)
