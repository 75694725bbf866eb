"""Tiny random modules, seeded: the same seeds give bit-identical weights on every run.

One function for the helpers that build their own tiny models (helpers_upscale.py,
helpers_depth.py, helpers_sdxl.py): each module is constructed right after
``torch.manual_seed`` of its own seed, inside ``fork_rng`` (the caller's torch RNG is
left as it was), then every parameter is perturbed from one generator (helpers_tiny's
``_perturb``: norm weights are all ones after init), in the order given, and put in
eval mode. tests/helpers_tiny.py's ``tiny_sd_components`` does the same for the tiny
SD models.
"""
from __future__ import annotations

from typing import Callable

import torch

from helpers_tiny import _perturb


def seeded_modules(builds: list[tuple[int, Callable[[], torch.nn.Module]]], perturb_seed: int
                   ) -> list[torch.nn.Module]:
    """``[build() seeded with seed for seed, build in builds]``, perturbed from
    ``perturb_seed`` in that order, eval mode."""
    modules = []
    with torch.random.fork_rng(devices=[]):
        for seed, build in builds:
            torch.manual_seed(seed)
            modules.append(build())
    gen = torch.Generator().manual_seed(perturb_seed)
    for m in modules:
        _perturb(m, gen)
        m.eval()
    return modules
