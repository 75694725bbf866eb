"""Text to image: pure noise, denoised under the prompt, decoded."""
from __future__ import annotations

import numpy as np

from .. import samplers
from ..config import GenerationRequest
from .model import LoadedModel
from .run import GenerationResult, ImageFn, ImageJob, ProgressFn, Run


def txt2img(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
            on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    run = Run(model, req, "txt2img", progress, on_image, keep_images=keep_images)
    run.make_plan()
    for job in run.jobs():
        run.finish_image(job, sample_txt2img(run, job))
    return run.result()


def sample_txt2img(run: Run, job: ImageJob) -> np.ndarray:
    """One image's final latents, not decoded: the job's noise times the plan's
    initial sigma, denoised by the job's guided UNet. The calibration of int8 /
    hybrid (export/calibrate.py) samples through here too, so it sees exactly
    the UNet inputs a txt2img run feeds."""
    x = samplers.initial_latents(run.plan, job.noise(run.latent_shape()))
    return run.sample(job, x)
