"""One mapping from CpuflowError to what a command-line user sees: one line on
stderr and the error's exit code (130 for Ctrl-C). Shared by `cpuflow` and the
commands it mounts (export, bench), which may also run on their own."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

import click

from .errors import CpuflowError


@contextmanager
def exit_on_error(interrupted: str = "interrupted: nothing was written") -> Iterator[None]:
    try:
        yield
    except CpuflowError as e:
        if os.environ.get("CPUFLOW_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        # SystemExit, not ctx.exit: a mounted command runs with standalone_mode=False,
        # where click would turn ctx.exit into a return value.
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
