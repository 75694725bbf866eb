"""OpenVINO: compile in f32 when the default (bf16) inference precision fails.

On CPUs with AMX / AVX512-BF16, OpenVINO's default inference precision is
bf16, and some graphs do not compile there: the full-size int8 LCM UNet fails
with "Not enough gp registers" (bench/README.md) while it compiles and runs in
f32. With ``precision="auto"`` (the default: the user did not choose), a
RuntimeError from ``compile_model`` is therefore retried ONCE with the f32
precision hint, and the session carries a warning naming the component, the
precision that failed and OpenVINO's reason. The run is then slower than bf16
would have been, but it runs instead of failing.

* ``precision="bf16"`` (asked for explicitly) is not overridden: the error says
  so and names ``--precision f32`` / ``auto``.
* If the f32 retry fails too, one :class:`BackendError` gives both reasons.
* With the compiled-model cache, the f32 compile is cached where an explicit
  ``--precision f32`` run caches it, and a marker file in the default
  precision's cache folder remembers the failure, so later starts go to f32
  directly instead of failing the (possibly long) bf16 compile again. The
  marker lives in a folder keyed by the OpenVINO version, CPU and model, so a
  new OpenVINO tries bf16 again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import BackendError

FALLBACK_FROM = ("auto",)      # only a precision the user did not choose is replaced
FALLBACK_TO = "f32"
MARKER = "default-precision-compile-failed.txt"
_REASON_CHARS = 300


def reason(e: BaseException) -> str:
    """OpenVINO's message, first meaningful line, shortened (its messages carry long
    source-location traces)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = next((ln for ln in lines if not ln.startswith(("Exception from", "Check '"))), lines[0] if lines else "")
    text = text or type(e).__name__
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


def remembered(cache_sub: Path | None) -> str | None:
    """The reason recorded by an earlier failed compile in this cache folder, if any."""
    if cache_sub is None:
        return None
    try:
        return (cache_sub / MARKER).read_text(encoding="utf-8").strip() or "an earlier compile failed"
    except OSError:
        return None


def remember(cache_sub: Path | None, why: str) -> None:
    if cache_sub is None:
        return
    try:
        (cache_sub / MARKER).write_text(why + "\n", encoding="utf-8")
    except OSError:
        pass  # a read-only cache only costs the retry next time


def compile_with_fallback(component: str, file_name: str, device: str, precision: str, default_name: str,
                          compile_at: Callable[[str], Any], cache_sub_of: Callable[[str], Path | None]
                          ) -> tuple[Any, str, Path | None, str | None]:
    """Compile, falling back to f32 as the module docstring says.

    ``compile_at(p)`` compiles with precision setting ``p`` ("auto", "f32",
    "bf16") and raises RuntimeError on failure; ``cache_sub_of(p)`` is the cache
    folder for ``p`` (or None without a cache); ``default_name`` names what
    "auto" means on this CPU (e.g. "bf16"), for the messages.
    Returns (compiled, precision used, its cache folder, warning or None)."""
    sub = cache_sub_of(precision)
    earlier = remembered(sub) if precision in FALLBACK_FROM else None
    if earlier is None:
        try:
            return compile_at(precision), precision, sub, None
        except RuntimeError as e:
            first = reason(e)
        if precision not in FALLBACK_FROM or default_name == FALLBACK_TO:  # nothing else to try
            hint = ("use --precision f32, or auto (which falls back to f32 by itself)"
                    if precision == "bf16" else None)
            raise BackendError(f"{component}: openvino failed to compile {file_name} for {device} "
                               f"in {precision}: {first}", hint=hint) from None
        remember(sub, first)
        why = f"compiling it in the default precision ({default_name}) failed: {first}"
    else:
        why = f"compiling it in the default precision ({default_name}) failed on an earlier start: {earlier}"
    sub_f32 = cache_sub_of(FALLBACK_TO)
    try:
        compiled = compile_at(FALLBACK_TO)
    except RuntimeError as e:
        raise BackendError(f"{component}: openvino failed to compile {file_name} for {device}: {why}; "
                           f"the retry in f32 failed too: {reason(e)}",
                           hint="try --backend onnxruntime, or another --variant (e.g. fp32)") from None
    warning = (f"{component}: runs in f32 because {why} "
               f"(slower than {default_name}; --precision f32 skips the attempt)")
    return compiled, FALLBACK_TO, sub_f32, warning
