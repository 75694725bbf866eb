"""Text to image: pure noise, denoised under the prompt, decoded."""
from __future__ import annotations

from .. import samplers
from ..config import GenerationRequest
from .model import LoadedModel
from .run import GenerationResult, ImageFn, ProgressFn, Run


def txt2img(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
            on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    run = Run(model, req, "txt2img", progress, on_image, keep_images=keep_images)
    plan = run.make_plan()
    for job in run.jobs():
        x = samplers.initial_latents(plan, job.noise(run.latent_shape()))
        run.finish_image(job, run.sample(job, x))
    return run.result()
