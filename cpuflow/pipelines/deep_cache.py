"""DeepCache at run time: full UNet every N calls, the shallow branch in between.

DeepCache (Ma et al., CVPR 2024) reuses the UNet's deep feature across
adjacent denoising steps. A folder exported with ``cpuflow export --deep-cache``
holds two more UNet graphs (export/deep_cache.py): ``unet_deepcache_full``
(the plain UNet's output plus ``deep_feature``) and ``unet_deepcache_shallow``
(the shallow branch, fed the cached feature).

Schedule: DeepCache's uniform one (``cache_interval`` N): call k (0-based) of an
image runs the full graph when k % N == 0, the shallow one otherwise. cpuflow
counts **UNet calls**, not sampler steps: for the one-call-a-step samplers
(ddim, plms, euler, euler_a, dpmpp_2m, lcm) that is exactly DeepCache's step
schedule; heun makes 2 calls a step, so with N = 2 its first call of each step
is full and the second shallow (the feature is then at most one call old,
wherever the schedule falls). The cache lives for one image: every image starts
with a full call. With classifier-free guidance the UNet runs at batch 2 and the
feature is batch 2 as well (uncond and cond rows cached together).

N = 1 (or None) does not use these graphs at all: the plain ``unet`` runs, so
the images are exactly those without --deep-cache.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..errors import ModelError
from .model import LoadedModel

FULL = "unet_deepcache_full"
SHALLOW = "unet_deepcache_shallow"
FEATURE = "deep_feature"
COMPONENTS = (FULL, SHALLOW)

UNetCall = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def enabled(every: int | None) -> bool:
    return every is not None and every > 1


def require(model: LoadedModel) -> None:
    """A clear error when the folder has no DeepCache graphs (for this backend)."""
    comps = model.manifest.components
    missing = [c for c in COMPONENTS if c not in comps or not any(model.format in v.files
                                                                  for v in comps[c].variants.values())]
    if missing:
        raise ModelError(f"{model.manifest.root} has no DeepCache UNet graphs"
                         + (f" in {model.format} format" if all(c in comps for c in COMPONENTS) else "")
                         + ", and --deep-cache needs them",
                         hint="re-export the model with `cpuflow export SOURCE OUT_DIR --deep-cache`, "
                              "or leave --deep-cache out")


def unet_call(model: LoadedModel, dims: Mapping[str, int], every: int | None) -> UNetCall:
    """``call(feeds) -> out_sample`` for one image: the plain UNet, or DeepCache
    with full compute every ``every`` calls. ``feeds``: the plain UNet's inputs."""
    if not enabled(every):
        return lambda feeds: model.run("unet", dims, feeds)["out_sample"]
    require(model)
    return _DeepCacheCall(model, dims, int(every))


class _DeepCacheCall:
    def __init__(self, model: LoadedModel, dims: Mapping[str, int], every: int):
        self.model = model
        self.dims = dict(dims)
        self.every = every
        self.calls = 0
        self.feature: np.ndarray | None = None
        self.shallow_inputs = [s.name for s in model.manifest.components[SHALLOW].inputs if s.name != FEATURE]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        full = self.calls % self.every == 0 or self.feature is None
        self.calls += 1
        if full:
            out = self.model.run(FULL, self.dims, feeds)
            self.feature = out[FEATURE]
            return out["out_sample"]
        shallow = {n: feeds[n] for n in self.shallow_inputs}
        shallow[FEATURE] = self.feature
        return self.model.run(SHALLOW, self.dims, shallow)["out_sample"]
