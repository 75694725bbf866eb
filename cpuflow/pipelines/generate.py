"""One entry point for every task: a request goes to the task it asks for.

The tasks are short functions over the shared stages of :mod:`.run`
(txt2img.py, img2img.py, ...); this module only chooses between them.
"""
from __future__ import annotations

from ..config import GenerationRequest
from .img2img import img2img
from .model import LoadedModel
from .run import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationResult, ImageFn, ProgressFn  # noqa: F401 (re-exported)
from .txt2img import txt2img

TASKS = {"txt2img": txt2img, "img2img": img2img}


def task_of(req: GenerationRequest) -> str:
    return "img2img" if req.init_image is not None else "txt2img"


def generate(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
             on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    """Run ``req`` on ``model``. ``on_image(image, record)`` gets each image as
    soon as it is made; ``keep_images=False`` keeps only the records in the result
    (a caller that writes images as they come need not hold them all)."""
    return TASKS[task_of(req)](model, req, progress, on_image, keep_images=keep_images)
