"""The Python API.

    >>> from cpuflow import Pipeline
    >>> pipe = Pipeline.load("exported/sd15", backend="openvino", threads=2)
    >>> result = pipe.txt2img("a red circle on a blue background", steps=20, seed=42)
    >>> result.images[0].save("out.png"); result.records[0]["seed"]
    42
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from .config import GenerationRequest, LoadConfig
from .errors import ImageInputError
from .pipelines.generate import GenerationResult, ImageFn, ProgressFn, check_request, generate
from .pipelines.model import LoadedModel
from .previews import PreviewFn, with_previews

_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)}
_LOAD_FIELDS = {f.name for f in fields(LoadConfig)}
_UPSCALE_FIELDS = {"negative_prompt", "noise_level", "steps", "sampler", "schedule", "guidance", "seed", "eta",
                   "rng", "tile", "watermark"}


class Pipeline:
    """An exported model loaded on one backend, ready to generate."""

    def __init__(self, model: LoadedModel):
        self.model = model

    @classmethod
    def load(cls, model: Any = None, **options: Any) -> "Pipeline":
        """Load an exported folder (``None``: the model shipped with cpuflow).
        Options: backend, device, precision, threads, variant, cache_dir,
        use_cache, verify, low_memory, max_session_bytes — see :class:`cpuflow.config.LoadConfig`."""
        unknown = set(options) - _LOAD_FIELDS
        if unknown:
            from .errors import InvalidArgument
            raise InvalidArgument(f"unknown load option(s): {', '.join(sorted(unknown))}")
        return cls(LoadedModel(LoadConfig(model=model, **options)))

    @property
    def manifest(self):
        return self.model.manifest

    def __call__(self, request: GenerationRequest, progress: ProgressFn | None = None, *,
                 preview: PreviewFn | None = None, preview_every: int = 1,
                 on_image: ImageFn | None = None) -> GenerationResult:
        """Run a request. ``on_image(image, record)`` gets each image as soon as it is made."""
        return generate(self.model, request, with_previews(self.model, progress, preview, preview_every),
                        on_image=on_image)

    def check(self, request: GenerationRequest) -> None:
        """Raise the error running ``request`` would raise, where it can be known
        without running it (see :func:`cpuflow.pipelines.generate.check_request`)."""
        check_request(self.model, request)

    def txt2img(self, prompt, *, progress: ProgressFn | None = None, preview: PreviewFn | None = None,
                preview_every: int = 1, **params: Any) -> GenerationResult:
        """Text to image. ``params``: negative_prompt, steps, sampler, schedule,
        guidance, width, height, seed, n_samples, eta, rng, decoder ("full" or
        "taesd": the tiny autoencoder, when the folder was exported with --taesd),
        clip_skip (A1111's: 1 = the model's own layer) and embeddings (textual-inversion
        files, "FILE" or "FILE:TOKEN"). Prompts take A1111's syntax (README "Prompts").
        watermark (default True: the invisible watermark of cpuflow/watermark.py on
        images of 256x256 or more; False: none; each record says which).
        deep_cache (N > 1: DeepCache, the full UNet every N calls, for folders
        exported with --deep-cache; cpuflow/pipelines/deep_cache.py).
        ``preview(image, info)`` gets a PIL preview every ``preview_every`` steps
        (through the tiny autoencoder when the folder has it, else a cheap
        latent -> RGB approximation at 1/8 size; see cpuflow/previews.py)."""
        if "init_image" in params:
            from .errors import InvalidArgument
            raise InvalidArgument("txt2img takes no init_image; use img2img")
        return self(_request(prompt, params), progress, preview=preview, preview_every=preview_every)

    def img2img(self, prompt, init_image, *, strength: float = 0.8, progress: ProgressFn | None = None,
                preview: PreviewFn | None = None, preview_every: int = 1, **params: Any) -> GenerationResult:
        """Image to image: the same loop started part-way down the noise
        schedule (``strength`` 1 ignores the image; a strength that leaves no
        denoising step, such as 0, raises :class:`InvalidArgument` naming the smallest that works).
        With ``decoder="taesd"`` the tiny autoencoder encodes and decodes.
        Size: without width / height the photo's aspect ratio at the model's native area
        (a 1600x1200 photo on SD 1.5: 592x440); with one, the other follows the photo; with
        both, those. ``resize`` ("crop" default, "fit", "stretch") says how the photo is
        brought there (cpuflow/resize.py); each record holds ``init_size`` and ``resize``."""
        if init_image is None:
            raise ImageInputError("img2img needs an init image (a path, bytes or a PIL image); "
                                  "for text to image use txt2img")
        return self(_request(prompt, dict(params, init_image=init_image, strength=strength)), progress,
                    preview=preview, preview_every=preview_every)

    def inpaint(self, prompt, init_image, mask, *, strength: float = 1.0, mask_blur: int = 0,
                inpaint_area: str = "whole", padding: int = 32, progress: ProgressFn | None = None,
                preview: PreviewFn | None = None, preview_every: int = 1, **params: Any) -> GenerationResult:
        """Repaint where ``mask`` is white (path, bytes or PIL image, any mode, resized to the image).
        An inpainting model (9-channel UNet) sees the mask and the masked image; an ordinary one
        gets the known region blended back after every step (as diffusers). ``inpaint_area="masked"``
        works only on the region around the mask (grown by ``padding`` pixels) at the model's size
        (or width / height) and pastes it back; "whole" sizes the picture and the mask as
        :meth:`img2img` does (``resize``). ``strength`` 1 (default, as diffusers) starts from noise."""
        return self(_request(prompt, dict(params, init_image=init_image, mask=mask, strength=strength,
                                          mask_blur=mask_blur, inpaint_area=inpaint_area, padding=padding)),
                    progress, preview=preview, preview_every=preview_every)

    def upscale(self, image, prompt: str = "", *, progress: ProgressFn | None = None,
                **params: Any) -> GenerationResult:
        """x4 upscale ``image`` (a path, bytes or PIL image) with an x4 upscaler folder
        (``cpuflow export stabilityai/stable-diffusion-x4-upscaler``). ``params``:
        negative_prompt, noise_level (default 20, 0..350), steps, sampler, schedule,
        guidance (default 9), seed, eta, rng, tile (None: automatic; N: latent tiles of
        at most N x N). See cpuflow/pipelines/upscale.py."""
        from .config import UpscaleRequest
        from .pipelines.upscale import upscale
        unknown = set(params) - _UPSCALE_FIELDS
        if unknown:
            from .errors import InvalidArgument
            raise InvalidArgument(f"unknown upscale parameter(s): {', '.join(sorted(unknown))}")
        return upscale(self.model, UpscaleRequest(image=image, prompt=prompt, **params), progress)

    def close(self) -> None:
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _request(prompt, params: dict) -> GenerationRequest:
    unknown = set(params) - _REQUEST_FIELDS
    if unknown:
        from .errors import InvalidArgument
        raise InvalidArgument(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    if isinstance(prompt, list):
        prompt = tuple(prompt)
    if isinstance(params.get("negative_prompt"), list):
        params["negative_prompt"] = tuple(params["negative_prompt"])
    return GenerationRequest(prompt=prompt, **params)
