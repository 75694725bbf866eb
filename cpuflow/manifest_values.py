"""Type and range checks of every number the runtime reads from a manifest.

A value in ``cpuflow.json`` gets the same rule as the same value typed on the
command line: ``defaults.steps`` and ``defaults.guidance`` those of
``--steps`` / ``--guidance``, ``default_size`` those of ``--width`` /
``--height`` (a multiple of 8, within the pixel budget), through the one
:class:`~cpuflow.config.GenerationRequest` that validates them. Values with no
command-line twin (latent scaling, token ids) get their own rule here. A bad
value is a :class:`~cpuflow.errors.ManifestError` (exit 3) naming the file and
the key, raised when the folder is loaded, before anything runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from .config import PRECISIONS, GenerationRequest
from .errors import InvalidArgument, ManifestError

_REEXPORT = "re-export the model with `cpuflow export`"
_MISSING = object()


def _bad(mpath: Path, key: str, why: str) -> ManifestError:
    return ManifestError(f"{mpath}: {key}: {why}", hint=_REEXPORT)


def _as_request(mpath: Path, key: str, **fields: Any) -> None:
    """The command line's own checks of these fields."""
    try:
        GenerationRequest(prompt="", **fields)
    except InvalidArgument as e:
        raise _bad(mpath, key, e.message) from None


def _int(mpath: Path, key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(mpath, key, f"must be a whole number, got {v!r}")
    if not lo <= v <= hi:
        raise _bad(mpath, key, f"must be between {lo} and {hi}, got {v}")
    return v


def _real(mpath: Path, key: str, v: Any, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(mpath, key, f"must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise _bad(mpath, key, f"must be above 0, got {v!r}")
    return float(v)


def _tokenizer(mpath: Path, key: str, tok: Any, encoder: Mapping[str, Any] | None) -> None:
    if not isinstance(tok, Mapping):
        raise _bad(mpath, key, "must be an object")
    cfg = (encoder or {}).get("config", {}) if isinstance(encoder, Mapping) else {}
    vocab = cfg.get("vocab_size") if isinstance(cfg, Mapping) else None
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else 10 ** 7
    positions = cfg.get("max_position_embeddings") if isinstance(cfg, Mapping) else None
    positions = positions if isinstance(positions, int) and not isinstance(positions, bool) else 1_000_000
    if tok.get("max_length", _MISSING) is not _MISSING:
        _int(mpath, f"{key}.max_length", tok["max_length"], 2, min(1_000_000, positions))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if tok.get(name) is not None:
            _int(mpath, f"{key}.{name}", tok[name], 0, vocab - 1)


def check_values(mpath: Path, data: Mapping[str, Any]) -> None:
    """Raise ManifestError for the first value of ``data`` (a parsed cpuflow.json) out of its type or range."""
    latent = data.get("latent")
    if not isinstance(latent, Mapping):
        raise _bad(mpath, "latent", "must be an object")
    _int(mpath, "latent.channels", latent.get("channels"), 1, 1024)
    down = _int(mpath, "latent.downscale", latent.get("downscale"), 1, 64)
    if down & (down - 1):
        raise _bad(mpath, "latent.downscale", f"must be a power of 2, got {down}")
    _real(mpath, "latent.scaling_factor", latent.get("scaling_factor"), positive=True)
    if latent.get("shift_factor") is not None:
        _real(mpath, "latent.shift_factor", latent["shift_factor"], positive=False)

    size = data.get("default_size")
    if not isinstance(size, Mapping):
        raise _bad(mpath, "default_size", "must be an object {width, height}")
    w, h = size.get("width"), size.get("height")
    _as_request(mpath, "default_size.width", width=w)
    _as_request(mpath, "default_size.height", height=h)
    _as_request(mpath, "default_size", width=w, height=h)
    for name, v in (("width", w), ("height", h)):
        if int(v) % down:
            raise _bad(mpath, f"default_size.{name}", f"must be a multiple of latent.downscale {down}, got {v}")

    comps = data.get("components") if isinstance(data.get("components"), Mapping) else {}
    _tokenizer(mpath, "tokenizer", data.get("tokenizer"), comps.get("text_encoder"))
    if "tokenizer_2" in data:
        _tokenizer(mpath, "tokenizer_2", data["tokenizer_2"], comps.get("text_encoder_2"))

    for name in ("taesd_decoder", "taesd_encoder"):
        cfg = comps.get(name, {}).get("config", {}) if isinstance(comps.get(name), Mapping) else {}
        if isinstance(cfg, Mapping) and cfg.get("scaling_factor") is not None:
            _real(mpath, f"components.{name}.config.scaling_factor", cfg["scaling_factor"], positive=True)

    sdxl = data.get("sdxl")
    if isinstance(sdxl, Mapping):
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if sdxl.get(name) is not None:
                _real(mpath, f"sdxl.{name}", sdxl[name], positive=False)

    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise _bad(mpath, "defaults", "must be an object")
    if defaults.get("steps") is not None:
        _as_request(mpath, "defaults.steps", steps=defaults["steps"])
        if not isinstance(defaults["steps"], int):   # the CLI takes 20.0 as 20; a manifest writes 20
            raise _bad(mpath, "defaults.steps", f"must be a whole number, got {defaults['steps']!r}")
    if defaults.get("guidance") is not None:
        _as_request(mpath, "defaults.guidance", guidance=defaults["guidance"])
    if defaults.get("precision") is not None and defaults["precision"] not in PRECISIONS:
        raise ManifestError(f"{mpath}: defaults.precision: the manifest's default precision "
                            f"{defaults['precision']!r} is not one of {', '.join(PRECISIONS)}",
                            hint="re-export the model or pass --precision")
    if defaults.get("variant") is not None and not isinstance(defaults["variant"], str):
        raise _bad(mpath, "defaults.variant", f"must be a variant name, got {defaults['variant']!r}")
