"""`cpuflow batch`: many images, resumable and exactly-once, on this machine or a Ray cluster.

    >>> import cpuflow.batch
    >>> summary = cpuflow.batch.run("jobs.jsonl", out="out/")            # doctest: +SKIP
    >>> summary = cpuflow.batch.run(prompts="prompts.txt", seeds="0..99", out="out/",
    ...                             params={"steps": 20}, ray="auto")    # doctest: +SKIP

See :func:`cpuflow.batch.runner.run`, and README.md "Many images".
"""
from __future__ import annotations

from .runner import Summary, run

__all__ = ["run", "Summary"]
