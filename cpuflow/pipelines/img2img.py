"""Image to image: the init image's latents noised part-way down the schedule
(``strength``), then the same loop as txt2img from there (SDEdit, Meng et al.
2022; diffusers' StableDiffusionImg2ImgPipeline)."""
from __future__ import annotations

from .. import samplers
from ..config import GenerationRequest
from ..errors import InvalidArgument
from ..image import image_to_array
from . import init_image
from .model import LoadedModel
from .run import GenerationResult, ImageFn, ProgressFn, Run
from .stages import EncodedImage, encode_image
from .taesd import encode_taesd


def img2img(model: LoadedModel, req: GenerationRequest, progress: ProgressFn | None = None,
            on_image: ImageFn | None = None, *, keep_images: bool = True) -> GenerationResult:
    if req.init_image is None:
        raise InvalidArgument("img2img needs an init image")
    run = Run(model, req, "img2img", progress, on_image, keep_images=keep_images)
    init = load_init(run)
    plan = run.make_plan(strength=run.req.strength)
    run.record_extra["strength"] = run.req.strength
    for job in run.jobs():
        noise_free = init.sample(model, job.generator)   # the encoder's draw comes first, as in diffusers
        x = samplers.initial_latents(plan, job.noise(run.latent_shape()), noise_free)
        run.finish_image(job, run.sample(job, x))
    return run.result()


def load_init(run: Run) -> EncodedImage:
    """The init image, read and sized (init_image.py: the request's -W/-H, else the
    model's native area at the photo's aspect ratio), encoded once for the whole
    request: the encoder's output does not depend on the seed, only the sample drawn
    from it does."""
    pixels = image_to_array(init_image.load_for(run))
    if run.tiny:   # the tiny encoder is deterministic: it draws nothing from the generator
        return EncodedImage(encode_taesd(run.model, pixels, run.timer), None)
    return encode_image(run.model, pixels, run.timer)
