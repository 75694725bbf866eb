"""Generation parameters read back from a PNG (``cpuflow generate --from-image OLD.png``).

Reads cpuflow's own record, or the AUTOMATIC1111 ``parameters`` text that
A1111, Forge, civitai downloads and cpuflow all write (cpuflow/image.py), and
returns the fields of a GenerationRequest it can fill: prompt, negative
prompt, seed, sampler, schedule, steps, guidance, size and clip skip. A sampler
or schedule cpuflow does not have is left out with a note (the model's default
is used), never guessed.
"""
from __future__ import annotations

import os
from typing import Any

from .errors import InvalidArgument

# The request fields --from-image fills, in the order they are reported.
FIELDS = ("prompt", "negative_prompt", "seed", "sampler", "schedule", "steps", "guidance", "width", "height",
          "clip_skip")


def params_from_png(source: str | os.PathLike | bytes) -> tuple[dict[str, Any], list[str]]:
    """(request fields, notes) from a PNG's parameters; InvalidArgument when it has none."""
    from .image import read_png_metadata
    from .samplers import SAMPLERS

    record = read_png_metadata(source)
    if not record or not str(record.get("prompt", "")).strip() and "steps" not in record:
        raise InvalidArgument(f"{_label(source)} carries no generation parameters (no cpuflow record and no "
                              "A1111 'parameters' text)")
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key in FIELDS:
        if record.get(key) is None or record.get(key) == "":
            continue
        value = record[key]
        if key in ("prompt", "negative_prompt"):
            out[key] = str(value)
        elif key == "sampler":
            if value in SAMPLERS:
                out[key] = value
            else:
                notes.append(f"sampler {value!r} of the image is not one cpuflow has; the model's default is used")
        elif key == "schedule":
            if value in ("default", "karras"):
                out[key] = value
            else:
                notes.append(f"schedule {value!r} of the image is not one cpuflow has; the default is used")
        elif key in ("seed", "steps", "width", "height", "clip_skip"):
            try:
                out[key] = int(value)
            except (TypeError, ValueError):
                notes.append(f"{key} {value!r} of the image is not a whole number; ignored")
        elif key == "guidance":
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                notes.append(f"guidance {value!r} of the image is not a number; ignored")
    return out, notes


def _label(source) -> str:
    return "the image" if isinstance(source, (bytes, bytearray)) else str(source)


def apply_from_image(ctx, png, given: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """The CLI's --from-image: the image's values for every option not given on
    the command line (click's parameter source tells them apart)."""
    import click
    from click.core import ParameterSource

    found, notes = params_from_png(png)
    out = dict(given)
    used = []
    for key, value in found.items():
        explicit = ctx.get_parameter_source(key) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
        if key == "prompt":
            explicit = given.get("prompt") is not None
        if not explicit:
            out[key] = value
            used.append(key)
    if not quiet:
        for n in notes:
            click.echo(f"note: {n}", err=True)
        click.echo(f"from {png}: {', '.join(used) if used else 'nothing (every value was given)'}", err=True)
    return out
