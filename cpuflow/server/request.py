"""One JSON generation request: its schema, its checks, and the
:class:`~cpuflow.config.GenerationRequest` it becomes.

The HTTP API (``POST /api/generate``, :mod:`cpuflow.server.app`) and ``cpuflow
batch`` (each JSONL line, :mod:`cpuflow.batch.jobs`) read the same JSON through
this module, so both accept the same fields, refuse the same mistakes with the
same words, and fill the same model defaults. It needs pydantic, not fastapi.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict

from ..config import MAX_PROMPT_CHARS, RESIZE_MODES, SCHEDULES, GenerationRequest, UpscaleRequest
from ..errors import ImageInputError, InvalidArgument, ResourceLimitError
from ..manifest import UPSCALER_FAMILY

_DATA_URL_RE = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.I)


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024        # per image
    max_steps: int = 150
    max_samples: int = 8                 # images per request
    max_prompt_chars: int = 2000
    max_body: int = 16 * 1024 * 1024     # bytes of request body (a base64 init image included)
    max_init_bytes: int = 11 * 1024 * 1024    # base64 makes it 4/3 larger: still under max_body
    max_queue: int = 8                   # jobs waiting behind the running one


class GenerateBody(BaseModel):
    """POST /api/generate. Unknown fields are refused (422); types are strict."""
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str = ""
    model: str | None = None             # an id from GET /api/models; none: the first model
    sampler: str | None = None           # none: the model's own scheduler
    schedule: Literal[SCHEDULES] = "default"  # type: ignore[valid-type]
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    width: int | None = None
    height: int | None = None
    seed: int | None = None              # none: random (the job reports it)
    n_samples: int = 1
    init_image: str | None = None        # base64 (or a data: URL) of a PNG/JPEG/WebP/...: img2img
    resize: Literal[RESIZE_MODES] = "crop"  # type: ignore[valid-type]  # crop | fit | stretch: cpuflow/resize.py
    strength: float | None = None        # none: 0.8 for img2img, 1.0 with a mask (as diffusers)
    mask: str | None = None              # base64 PNG (or any image), white = repaint: inpainting, with init_image
    mask_blur: int = 0
    inpaint_area: Literal["whole", "masked"] = "whole"   # masked: the region around the mask at model size
    padding: int = 32
    eta: float = 0.0
    rng: Literal["torch", "numpy"] = "torch"
    decoder: Literal["full", "taesd"] = "full"   # taesd: the tiny autoencoder (models with "taesd": true)
    clip_skip: int | None = None         # A1111's meaning (1 = the model's own layer); none: the model's
    watermark: bool = True               # the invisible watermark (false: none)
    deep_cache: int | None = None        # DeepCache: full UNet every N calls (models with "deep_cache": true)
    embeddings: list[str] = []           # names from GET /api/models "embeddings" (loaded with serve --embedding)


class ParamsFromImageBody(BaseModel):
    """POST /api/params-from-image: a PNG (base64 or data: URL) whose parameters fill the form."""
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str


class UpscaleBody(BaseModel):
    """POST /api/upscale: a finished image, by the id the server gave it, upscaled 4x with the
    prompt, negative prompt and seed it was made with (unless given here)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str                           # an image id from a finished job
    model: str | None = None             # an upscaler id from GET /api/models; none: the first upscaler
    noise_level: int | None = None       # none: the model's (20)
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None              # none: the image's own seed
    watermark: bool = True               # the invisible watermark on the upscaled image


def validation_problems(errors: Iterable[dict]) -> str:
    """pydantic's errors as one line ("unknown field 'x'; steps: Input should be ...")."""
    problems = []
    for err in list(errors)[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")[:64] or "body"
        if err.get("type") == "extra_forbidden":
            problems.append(f"unknown field {loc!r}")
        elif err.get("type") == "json_invalid":
            problems.append("the body is not valid JSON")
        elif err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            problems.append("the body must be a JSON object")
        else:
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(dict.fromkeys(problems)) or "invalid request"


def describe(mid: str, pipe: Any) -> dict:
    """What a client needs to know about a model (no paths): its defaults and abilities."""
    model = getattr(pipe, "model", None)
    m = getattr(model, "manifest", None)
    defaults = (getattr(m, "raw", None) or {}).get("defaults", {}) if m is not None else {}
    components = getattr(m, "components", {}) or {}
    sampler = None
    if model is not None and hasattr(model, "default_sampler"):
        try:
            sampler = model.default_sampler()
        except Exception:
            sampler = None
    return {
        "id": mid,
        "name": str(getattr(m, "name", mid)),
        "width": int(getattr(m, "default_width", 512) or 512),
        "height": int(getattr(m, "default_height", 512) or 512),
        "steps": int(defaults.get("steps", 20)),
        "guidance": float(defaults.get("guidance", 7.5)),
        "sampler": sampler,
        "size_multiple": int(getattr(model, "size_multiple", 8) or 8),
        "img2img": "vae_encoder" in components,
        "upscaler": str(getattr(m, "family", "")) == UPSCALER_FAMILY,   # for POST /api/upscale, not generate
        "max_noise_level": int(((getattr(m, "raw", None) or {}).get("upscaler") or {}).get("max_noise_level", 0)),
        "deep_cache": "unet_deepcache_full" in components,   # exported with --deep-cache
        "taesd": "taesd_decoder" in components,     # exported with --taesd: decoder "taesd", full-size previews
        "random_weights": bool(getattr(m, "random_weights", False)),
        "model_hash": str(getattr(m, "model_hash", "")),
    }


def build_request(body: GenerateBody, info: dict, limits: Limits,
                  init_bytes: bytes | None = None, embedding_specs: dict[str, str] | None = None
                  ) -> tuple[GenerationRequest, dict]:
    """The request and its parameters with the model's defaults filled in.
    ``init_bytes``: the init image's bytes (the caller read them: base64 from the
    HTTP body, a file for a batch job); none and ``body.init_image`` set: decoded here."""
    embedding_specs = embedding_specs or {}
    unknown = [e for e in body.embeddings if e not in embedding_specs]
    if unknown:
        have = ", ".join(sorted(embedding_specs)) or "none (start the server with --embedding FILE)"
        raise InvalidArgument(f"unknown embedding {unknown[0]!r}; this server has: {have}")
    for name in ("prompt", "negative_prompt"):
        n = len(getattr(body, name))
        if n > min(limits.max_prompt_chars, MAX_PROMPT_CHARS):
            raise ResourceLimitError(f"{name} has {n} characters; this server's limit is {limits.max_prompt_chars}")
    if isinstance(body.n_samples, int) and body.n_samples > limits.max_samples:
        raise ResourceLimitError(f"n_samples {body.n_samples} is over this server's limit of {limits.max_samples}")
    if body.steps is not None and body.steps > limits.max_steps:
        raise ResourceLimitError(f"steps {body.steps} is over this server's limit of {limits.max_steps}")
    if init_bytes is None and body.init_image is not None:
        init_bytes = decode_base64(body.init_image, limits.max_init_bytes)
    width, height = body.width, body.height
    if init_bytes is not None:
        from ..image import load_init_image, read_init_image
        from ..resize import working_size
        for name, v in (("width", width), ("height", height)):
            if v is not None and (isinstance(v, bool) or v <= 0 or v % 8):
                raise InvalidArgument(f"{name} must be a positive multiple of 8, got {v}")
        # bytes and a neutral name: no path is ever opened, none reaches an error message
        masked = body.mask is not None and body.inpaint_area == "masked"
        if masked:   # the picture keeps its size; the model works at width x height
            img = load_init_image(init_bytes, name="(uploaded)")
            if img.width * img.height > limits.max_pixels:
                raise ResourceLimitError(f"the init image's {img.width}x{img.height} pixels are over this "
                                         f"server's limit of {limits.max_pixels} pixels per image")
        else:   # the size the pipeline would choose (cpuflow/resize.py), made explicit for the job's params
            photo = read_init_image(init_bytes, name="(uploaded)").size
            width, height = working_size(photo, width, height, native=(info["width"], info["height"]),
                                         multiple=info["size_multiple"])
    mask_bytes = None
    if body.mask is not None:
        if init_bytes is None:
            raise InvalidArgument("a mask needs an init_image (the picture to repaint)")
        mask_bytes = decode_base64(body.mask, limits.max_init_bytes, what="mask")
    width = width if width is not None else info["width"]
    height = height if height is not None else info["height"]
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0 \
            and width * height > limits.max_pixels:
        raise ResourceLimitError(f"{width}x{height} = {width * height} pixels is over this server's limit "
                                 f"of {limits.max_pixels} pixels per image")
    req = GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                            sampler=body.sampler, schedule=body.schedule, guidance=body.guidance,
                            guidance_rescale=body.guidance_rescale, width=width, height=height, seed=body.seed,
                            n_samples=body.n_samples,
                            eta=body.eta, init_image=init_bytes, resize=body.resize,
                            strength=body.strength if body.strength is not None else
                            1.0 if mask_bytes is not None else 0.8,
                            rng=body.rng, decoder=body.decoder, mask=mask_bytes, mask_blur=body.mask_blur,
                            inpaint_area=body.inpaint_area, padding=body.padding, clip_skip=body.clip_skip,
                            embeddings=tuple(embedding_specs[e] for e in body.embeddings),
                            watermark=body.watermark, deep_cache=body.deep_cache).with_seed()
    if req.decoder == "taesd" and not info.get("taesd"):
        raise InvalidArgument(f"decoder taesd needs a model exported with --taesd; model {info['id']} has no "
                              "tiny autoencoder (use decoder full)")
    mult = info["size_multiple"]
    for name, v in (("width", req.width), ("height", req.height)):
        if v % mult:
            raise InvalidArgument(f"{name} must be a multiple of {mult} for this model, got {v}")
    params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "model": info["id"],
              "sampler": req.sampler or info["sampler"], "schedule": req.schedule,
              "steps": req.steps if req.steps is not None else info["steps"],
              "guidance": req.guidance if req.guidance is not None else info["guidance"],
              "width": req.width, "height": req.height, "seed": req.seed, "n_samples": req.n_samples,
              "img2img": init_bytes is not None, "strength": req.strength, "eta": req.eta, "rng": req.rng,
              "decoder": req.decoder, "clip_skip": req.clip_skip, "embeddings": list(body.embeddings),
              "watermark": req.watermark, "deep_cache": req.deep_cache}
    if init_bytes is not None:
        params["resize"] = req.resize
    if mask_bytes is not None:
        params.update(inpaint=True, mask_blur=req.mask_blur, inpaint_area=req.inpaint_area, padding=req.padding)
    return req, params


def build_upscale(body: UpscaleBody, png: bytes, record: dict, info: dict,
                   limits: Limits) -> tuple[UpscaleRequest, dict]:
    if body.steps is not None and body.steps > limits.max_steps:
        raise ResourceLimitError(f"steps {body.steps} is over this server's limit of {limits.max_steps}")
    w, h = int(record.get("width", 0)), int(record.get("height", 0))
    if 16 * w * h > limits.max_pixels:
        raise ResourceLimitError(f"{w}x{h} upscaled 4x is {16 * w * h} pixels, over this server's limit of "
                                 f"{limits.max_pixels} pixels per image")
    if body.noise_level is not None and not 0 <= body.noise_level <= info["max_noise_level"]:
        raise InvalidArgument(f"noise_level must be between 0 and {info['max_noise_level']} for this model, "
                              f"got {body.noise_level}")
    seed = body.seed if body.seed is not None else record.get("seed")
    req = UpscaleRequest(image=png, prompt=str(record.get("prompt", "")),
                         negative_prompt=str(record.get("negative_prompt", "")), noise_level=body.noise_level,
                         steps=body.steps, guidance=body.guidance, seed=seed, watermark=body.watermark)
    params = {"task": "upscale", "model": info["id"], "prompt": req.prompt, "negative_prompt": req.negative_prompt,
              "noise_level": req.noise_level, "steps": req.steps if req.steps is not None else info["steps"],
              "seed": seed, "image": body.image}
    return req, params


def decode_base64(text: str, max_bytes: int, what: str = "init image") -> bytes:
    s = _DATA_URL_RE.sub("", text.strip(), count=1)
    if len(s) > (max_bytes * 4) // 3 + 4:
        raise ResourceLimitError(f"{what} is over this server's limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{what} is not valid base64") from None
    if not data:
        raise ImageInputError(f"{what} is empty")
    return data
