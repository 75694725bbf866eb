"""Generation defaults written into the manifest for few-step models.

The runtime takes ``steps`` and ``guidance`` from the manifest's optional
``defaults`` when the user gives none (cpuflow/pipelines/generate.py, the web
page). A model whose own scheduler is LCMScheduler is an LCM: 20 steps at
guidance 7.5 (the general defaults) would be slow, and for an LCM without a
guidance embedding, guidance above 1 doubles the UNet calls for nothing it was
trained for. So:

* LCMScheduler + guidance-embedding UNet (``time_cond_proj_dim``): 4 steps,
  guidance 8.5 (diffusers' LatentConsistencyModelPipeline default).
* LCMScheduler, plain UNet (e.g. a model with LCM-LoRA fused and its scheduler
  switched): 4 steps, guidance 1 (no unconditional branch).

Nothing is written for other models (a Turbo model is not told apart from its
base by its config; pass ``--steps 1 --guidance 0`` for it).
"""
from __future__ import annotations

from typing import Any, Mapping

LCM_STEPS = 4
LCM_GUIDANCE_EMBEDDED = 8.5
LCM_GUIDANCE_PLAIN = 1.0


def few_step_defaults(scheduler_config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> dict:
    if str(scheduler_config.get("_class_name", "")) != "LCMScheduler":
        return {}
    embedded = unet_config.get("time_cond_proj_dim") is not None
    return {"steps": LCM_STEPS, "guidance": LCM_GUIDANCE_EMBEDDED if embedded else LCM_GUIDANCE_PLAIN}
