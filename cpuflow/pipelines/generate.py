"""One entry point for every task: a request goes to the task it asks for.

The tasks are short functions over the shared stages of :mod:`.run`
(txt2img.py, img2img.py, ...); this module only chooses between them.
"""
from __future__ import annotations

from .. import samplers
from ..config import GenerationRequest
from .depth import depth2img
from .img2img import img2img
from .inpaint import inpaint
from .model import LoadedModel
from .run import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationResult, ImageFn, ProgressFn, resolve_params  # noqa: F401
from .txt2img import txt2img

TASKS = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint, "depth2img": depth2img}


def task_of(req: GenerationRequest, manifest=None) -> str:
    """A mask, or an inpainting UNet (which runs every request as inpainting, see inpaint.py):
    inpaint; a depth map, or a depth UNet: depth2img; else img2img with an init image, txt2img."""
    kind = getattr(manifest, "unet_kind", "txt2img")
    if req.mask is not None or kind == "inpaint":
        return "inpaint"
    if req.depth_map is not None or kind == "depth":
        return "depth2img"
    return "img2img" if req.init_image is not None else "txt2img"


def generate(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
             on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    """Run ``req`` on ``model``. ``on_image(image, record)`` gets each image as
    soon as it is made; ``keep_images=False`` keeps only the records in the result
    (a caller that writes images as they come need not hold them all)."""
    from .upscale import refuse_upscaler   # an x4 upscaler folder: `cpuflow upscale`, not a task here
    refuse_upscaler(model)
    return TASKS[task_of(req, model.manifest)](model, req, progress, on_image, keep_images=keep_images)


def check_request(model: LoadedModel, req: GenerationRequest) -> None:
    """Refuse now what running ``req`` would refuse later and cheaply can be known
    now: the model's size multiple, and the sampling plan (a strength that leaves
    no denoising step, a schedule the sampler does not take). The server calls it
    before queueing, so such a request is a 422, not a job that fails."""
    p = resolve_params(model, req)
    samplers.make_plan(p["sampler"], model.scheduler_config(), p["steps"], schedule=req.schedule,
                       strength=req.strength if req.init_image is not None else 1.0)
