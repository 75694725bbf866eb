"""Generation defaults written into the manifest for few-step models.

The runtime takes ``steps`` and ``guidance`` from the manifest's optional
``defaults`` when the user gives none (cpuflow/pipelines/generate.py, the web
page). Without them a model gets the general 20 steps at guidance 7.5, which
is wrong for few-step models. Decided at export, first match wins per key:

1. the user: ``cpuflow export ... --default-steps N --default-guidance G``
   (:func:`user_defaults`), for any model;
2. a known Turbo model (adversarial diffusion distillation, Sauer et al. 2023):
   the hub ids ``stabilityai/sd-turbo`` / ``stabilityai/sdxl-turbo`` and the
   random-weights arch ``sd21-turbo``: 1 step, guidance 0 (the model cards' and
   diffusers' recipe: ``num_inference_steps=1, guidance_scale=0.0``). Their
   scheduler configs are their base models' (Euler, "trailing" spacing is the
   only hint, and other models use it too), so the source's NAME is what tells
   them apart; a local copy of the folder is not recognised: pass
   ``--default-steps 1 --default-guidance 0``;
3. the model's own scheduler is LCMScheduler (an LCM, SD 1.5 or SDXL):
   * with a guidance-embedding UNet (``time_cond_proj_dim``): 4 steps,
     guidance 8.5 (diffusers' LatentConsistencyModelPipeline default);
   * with a plain UNet (e.g. LCM-LoRA fused and the scheduler switched):
     4 steps, guidance 1 (no unconditional branch).

Nothing is written for other models.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from cpuflow.config import MAX_GUIDANCE, MAX_STEPS
from cpuflow.errors import InvalidArgument

LCM_STEPS = 4
LCM_GUIDANCE_EMBEDDED = 8.5
LCM_GUIDANCE_PLAIN = 1.0

TURBO_STEPS = 1
TURBO_GUIDANCE = 0.0
# lower-case hub ids of the published Turbo models, and the random-weights arch that mimics one
TURBO_HUB_IDS = ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo")
TURBO_ARCHES = ("sd21-turbo",)


def few_step_defaults(scheduler_config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> dict:
    """The LCM rule (3) alone: from the scheduler class and the UNet config."""
    if str(scheduler_config.get("_class_name", "")) != "LCMScheduler":
        return {}
    embedded = unet_config.get("time_cond_proj_dim") is not None
    return {"steps": LCM_STEPS, "guidance": LCM_GUIDANCE_EMBEDDED if embedded else LCM_GUIDANCE_PLAIN}


def is_known_turbo(source: Mapping[str, Any] | None) -> bool:
    """Rule (2): ``source`` is the manifest's ``source`` record ({kind, name, ...})."""
    if not source:
        return False
    kind, name = str(source.get("kind", "")), str(source.get("name", "")).strip().strip("/").lower()
    return (kind == "hub" and name in TURBO_HUB_IDS) or (kind == "random" and name in TURBO_ARCHES)


def user_defaults(steps: Any = None, guidance: Any = None) -> dict:
    """Rule (1), checked as the runtime checks --steps / --guidance: ``--default-steps``
    an integer 1..1000, ``--default-guidance`` a number 0..100. Only the given keys come back."""
    out: dict = {}
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise InvalidArgument(f"--default-steps {steps!r} is invalid: give a whole number of steps from 1 to "
                                  f"{MAX_STEPS} (e.g. --default-steps 1 for SD-Turbo, 4 for an LCM)")
        out["steps"] = int(steps)
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or not 0 <= guidance <= MAX_GUIDANCE:
            raise InvalidArgument(f"--default-guidance {guidance!r} is invalid: give a number from 0 to "
                                  f"{MAX_GUIDANCE:g} "
                                  "(e.g. --default-guidance 0 for SD-Turbo; 1 or less runs no negative branch)")
        out["guidance"] = float(guidance)
    return out


def generation_defaults(scheduler_config: Mapping[str, Any], unet_config: Mapping[str, Any],
                        source: Mapping[str, Any] | None = None, *, steps: Any = None,
                        guidance: Any = None) -> dict:
    """The manifest's ``defaults`` steps / guidance by rules 1-3 (user first), or {}."""
    if is_known_turbo(source):
        decided = {"steps": TURBO_STEPS, "guidance": TURBO_GUIDANCE}
    else:
        decided = few_step_defaults(scheduler_config, unet_config)
    return {**decided, **user_defaults(steps, guidance)}
