"""What the worker thread does with one job: run the pipeline, report progress,
honour cancellation, store the images."""
from __future__ import annotations

import io
from typing import Callable

from ..config import UpscaleRequest
from ..errors import Cancelled
from ..image import png_metadata
from .jobs import ImageStore, Job
from .preview import make_preview, preview_interval


def make_runner(models: dict, store: ImageStore, *, preview_every: int | None = None) -> Callable[[Job], None]:
    """``models``: id -> Pipeline (anything with ``__call__(request, progress=)``)."""

    def run(job: Job) -> None:
        pipe = models[job.model_id]
        width, height = job.params.get("width"), job.params.get("height")

        def progress(event: dict) -> None:
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            step, n_steps = int(event.get("step", 0)), int(event.get("n_steps", 0))
            changes = {"step": step, "n_steps": n_steps, "image": int(event.get("image", 0)),
                       "n_images": int(event.get("n_images", job.n_images))}
            every = preview_interval(n_steps, preview_every)
            if width and height and step < n_steps and step % every == 0:
                url = make_preview(pipe, event, int(width), int(height))
                if url is not None:
                    changes.update(preview=url, preview_step=step)
            job.update(**changes)
            if job.cancel.is_set():
                raise Cancelled("cancelled")

        if isinstance(job.request, UpscaleRequest):
            from ..pipelines.upscale import upscale
            result = upscale(pipe.model, job.request, progress)
        else:
            result = pipe(job.request, progress=progress)
        if job.cancel.is_set():   # cancelled during the last decode: keep nothing
            raise Cancelled("cancelled")
        images = []
        for img, record in zip(result.images, result.records):
            buf = io.BytesIO()
            img.save(buf, format="PNG", pnginfo=png_metadata(record))
            image_id = store.put(buf.getvalue(), record)
            images.append({"id": image_id, "url": f"/api/images/{image_id}", "seed": record.get("seed"),
                           "width": img.size[0], "height": img.size[1], "record": _public(record)})
        job.update(images=images, warnings=list(result.warnings), step=job.n_steps,
                   image=max(job.n_images - 1, 0))

    return run


def _public(record: dict) -> dict:
    """The record as JSON-safe values (it goes to the client as is)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {str(a): (b if isinstance(b, (str, int, float, bool)) or b is None else str(b))
                      for a, b in v.items()}
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out
