"""`cpuflow watermark IMAGE...`: read the invisible watermark of images (cpuflow/watermark.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

EXAMPLES_WATERMARK = """
\b
Examples:
  cpuflow watermark outputs/image-00000.png
  cpuflow watermark outputs/*.png photo.jpg
\b
Prints one line per file: the watermark found (cpuflow's, with the version
that wrote it, and which of its two marks read it: the DWT-DCT chroma mark
that invisible-watermark also reads, the luma mark that survives an ordinary
JPEG; the Stable Diffusion 1 / 2 scripts'; SDXL's), or "no watermark found". A file that is not a readable image gets one error line
on stderr, the others are still read, and the exit code is then 2.
"""


_MARK_NAMES = {"dwtDct": "DWT-DCT chroma mark", "luma": "luma mark"}


@click.command("watermark", epilog=EXAMPLES_WATERMARK)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def watermark_command(images):
    """Look for an invisible (DWT-DCT) watermark in each IMAGE."""
    from .errors import InvalidArgument
    from .image import MAX_INIT_PIXELS, load_image_as_stored
    from .watermark import detect, too_small

    failed = False
    for path in images:
        try:
            img = load_image_as_stored(path, max_pixels=MAX_INIT_PIXELS, name=repr(str(path)))
        except InvalidArgument as e:      # not an image, damaged, too large (exit code 2)
            click.echo(f"error: {e}", err=True)
            failed = True
            continue
        reason = too_small(*img.size)
        if reason:
            click.echo(f"{path}: no watermark found (too small to carry one: {reason})")
            continue
        found = detect(img)
        if found is None:
            click.echo(f"{path}: no watermark found")
        else:
            read_by = "; ".join(f"{_MARK_NAMES[mark]}: {agreement:.0%} of its 8x8 blocks agree"
                                for mark, agreement in found.marks)
            click.echo(f"{path}: {found.name} (message {found.message!r}; {read_by})")
    if failed:
        sys.exit(2)
