"""The init image of img2img, inpainting and depth-to-image, at the size the model works at.

One place for the three tasks and for the CLI's line that says the size: the photo is
read as it is (cpuflow/image.py ``read_init_image``: RGB, EXIF turn, own size), its
working size chosen from the request's width / height and the model's native area
(cpuflow/resize.py ``working_size``), and it is brought there by the request's
``resize`` mode (``resize_to``; an inpainting mask goes through the same call, so it
stays on the picture). Every image's record says what happened: ``init_size`` (the
photo's size) and ``resize`` beside the ``width`` / ``height`` it was made at.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from .. import resize
from ..config import GenerationRequest
from ..image import init_image_size, read_init_image
from .model import LoadedModel


def working_size(model: LoadedModel, photo: tuple[int, int], req: GenerationRequest) -> tuple[int, int]:
    """The size a photo of size ``photo`` is worked at for ``req`` on ``model``: the
    model's native area (its manifest's default size) and size multiple."""
    m = model.manifest
    return resize.working_size(photo, req.width, req.height, native=(m.default_width, m.default_height),
                               multiple=model.size_multiple)


@dataclass(frozen=True)
class InitImage:
    """A photo as read, and the size and mode it is worked at."""
    photo: Image.Image           # RGB, its own size
    size: tuple[int, int]        # (width, height) the model works at
    mode: str                    # crop | fit | stretch

    def sized(self, img: Image.Image | None = None) -> Image.Image:
        """The photo (or an image of the photo's size laid over it: the mask) at the working size."""
        return resize.resize_to(self.photo if img is None else img, self.size, self.mode)

    def record(self) -> dict[str, Any]:
        return {"init_size": f"{self.photo.width}x{self.photo.height}", "resize": self.mode}


def load(model: LoadedModel, req: GenerationRequest) -> InitImage:
    photo = read_init_image(req.init_image)
    return InitImage(photo, working_size(model, photo.size, req), req.resize)


def load_for(run) -> Image.Image:
    """The run's init image at its working size; the run takes that size and records both."""
    init = load(run.model, run.req)
    run.set_size(*init.size)
    run.record_extra.update(init.record())
    return init.sized()


def announce(model: LoadedModel, req: GenerationRequest) -> str | None:
    """The line the CLI prints before it starts (``img2img: 1600x1200 photo -> 592x440 (crop)``),
    from the photo's header: None without an init image, and for "only masked" inpainting
    (the picture keeps its size; the region around the mask is worked at width x height)."""
    if req.init_image is None or (req.mask is not None and req.inpaint_area == "masked"):
        return None
    from .generate import task_of   # generate imports the tasks, which import this module
    from .upscale import refuse_upscaler
    refuse_upscaler(model)          # its error, not a size line, for an x4 upscaler folder
    photo = init_image_size(req.init_image)
    return resize.describe(task_of(req, model.manifest), photo, working_size(model, photo, req), req.resize)
