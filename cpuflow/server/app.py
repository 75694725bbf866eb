"""The FastAPI application: one page and a JSON API.

Routes (all JSON errors are ``{"error": {"code": ..., "message": ...}}``)::

    GET    /                        the page (inline CSS/JS, nothing from outside)
    GET    /api/models              models (server-made ids), samplers, limits
    POST   /api/generate            202 {job}; 413 caps; 415 not JSON; 422 bad input; 429 queue full
    GET    /api/jobs                recent jobs
    GET    /api/jobs/{id}           status, progress, preview, images
    GET    /api/jobs/{id}/events    server-sent events: "progress" ..., then "done" | "failed" | "cancelled"
    POST   /api/jobs/{id}/cancel    cancel (also DELETE /api/jobs/{id}); 409 when already finished
    GET    /api/images/{id}         PNG with its parameters in the metadata
    GET    /api/openapi.json        the OpenAPI schema
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import MAX_PROMPT_CHARS, GenerationRequest
from ..errors import CpuflowError, InvalidArgument, ResourceLimitError
from .jobs import ImageStore, Job, JobQueue, QueueFull, scrub
from .runner import make_runner
from .security import SecurityMiddleware, default_allowed_hosts, security_headers

PAGE = Path(__file__).with_name("page.html")
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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
    schedule: Literal["default", "karras"] = "default"
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None              # none: random (the job reports it)
    n_samples: int = 1
    init_image: str | None = None        # base64 (or a data: URL) of a PNG/JPEG/WebP/...: img2img
    strength: float = 0.8
    eta: float = 0.0
    rng: Literal["torch", "numpy"] = "torch"
    decoder: Literal["full", "taesd"] = "full"   # taesd: the tiny autoencoder (models with "taesd": true)
    deep_cache: int | None = None        # DeepCache: full UNet every N calls (models with "deep_cache": true)


def create_app(models: Mapping[str, Any], *, token: str | None = None, allowed_hosts=None, port: int = 7860,
               max_queue: int | None = None, limits: Limits | None = None, load_options: dict | None = None,
               preview_every: int | None = None) -> FastAPI:
    """``models``: id -> exported model folder, ``None`` (the shipped model) or a
    loaded :class:`cpuflow.Pipeline`. ``allowed_hosts``: exact Host header values
    (default: localhost / 127.0.0.1 / [::1] with ``port``)."""
    limits = limits or Limits()
    if max_queue is not None:
        limits = replace(limits, max_queue=max_queue)
    if not models:
        raise InvalidArgument("the server needs at least one model")
    pipes: dict[str, Any] = {}
    paths: list[str] = []
    for mid, m in models.items():
        if not isinstance(mid, str) or not MODEL_ID_RE.match(mid):
            raise InvalidArgument(f"model id {mid!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if m is None or isinstance(m, (str, Path)):
            from ..api import Pipeline
            if m is not None:
                paths.append(str(Path(m).resolve()))
            m = Pipeline.load(m, **(load_options or {}))
        pipes[mid] = m
    infos = {mid: describe(mid, p) for mid, p in pipes.items()}
    default_model = next(iter(pipes))
    secret_strings = tuple(s for s in [token, *paths] if s)

    store = ImageStore()
    queue = JobQueue(make_runner(pipes, store, preview_every=preview_every), max_queue=limits.max_queue,
                     secret_strings=secret_strings)
    page, page_csp = _load_page()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.stop()

    app = FastAPI(title="cpuflow", version=__version__, openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None, lifespan=lifespan, redirect_slashes=False,
                  description="Stable Diffusion on a CPU: a local page and JSON API (see README).")
    app.state.jobs, app.state.images, app.state.pipes, app.state.limits = queue, store, pipes, limits
    hosts = list(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts(port)
    app.add_middleware(SecurityMiddleware, allowed_hosts=hosts, token=token, max_body=limits.max_body,
                       page_csp=page_csp)
    _install_error_handlers(app, secret_strings)

    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse(page)

    @app.get("/api/models", summary="Models, samplers and limits")
    def list_models():
        from ..samplers import SAMPLERS
        return {"models": [dict(info, default=(mid == default_model)) for mid, info in infos.items()],
                "samplers": [{"name": n, "description": s.description} for n, s in SAMPLERS.items()],
                "schedules": ["default", "karras"],
                "limits": {"max_pixels": limits.max_pixels, "max_steps": limits.max_steps,
                           "max_samples": limits.max_samples, "max_prompt_chars": limits.max_prompt_chars,
                           "max_init_bytes": limits.max_init_bytes, "max_queue": limits.max_queue}}

    @app.post("/api/generate", status_code=202, summary="Queue a generation; returns the job")
    def generate(body: GenerateBody):
        model_id = body.model if body.model is not None else default_model
        if model_id not in pipes:
            raise InvalidArgument(f"model must be one of {', '.join(pipes)} (see /api/models)")
        req, params = _build_request(body, infos[model_id], limits)
        job = Job(model_id=model_id, request=req, params=params, n_images=req.n_samples)
        try:
            pos = queue.submit(job)
        except QueueFull as e:
            return _error(429, e.code, str(e), headers={"Retry-After": str(e.retry_after)})
        return JSONResponse(job.to_json(position=pos), status_code=202,
                            headers={"Location": f"/api/jobs/{job.id}"})

    @app.get("/api/jobs", summary="Recent jobs, newest first")
    def list_jobs():
        return {"jobs": [j.to_json(position=queue.position(j), preview=False) for j in reversed(queue.jobs())]}

    @app.get("/api/jobs/{job_id}", summary="A job's status, progress, preview and images")
    def get_job(job_id: str):
        job = _job(queue, job_id)
        return job.to_json(position=queue.position(job))

    @app.get("/api/jobs/{job_id}/events", summary="Server-sent events for a job",
             response_class=EventSourceResponse)
    async def job_events(job_id: str):
        job = _job(queue, job_id)
        # sse-starlette: event framing, keep-alive pings every 15 s, and the end of
        # the stream when the client goes away.
        return EventSourceResponse(_event_stream(job, queue), ping=15, sep="\n")

    def cancel(job_id: str):
        job = _job(queue, job_id)
        if job.status in ("done", "failed"):
            return _error(409, "already_finished", f"the job has already {'finished' if job.status == 'done' else 'failed'}")
        queue.cancel(job)
        return job.to_json(position=queue.position(job), preview=False)

    app.post("/api/jobs/{job_id}/cancel", summary="Cancel a job (stops within about one step)")(cancel)
    app.delete("/api/jobs/{job_id}", summary="Cancel a job (same as POST .../cancel)")(cancel)

    @app.get("/api/images/{image_id}", summary="A finished image (PNG, parameters in its metadata)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def get_image(image_id: str):
        item = store.get(image_id)
        if item is None:
            raise StarletteHTTPException(404)
        png, record = item
        seed = record.get("seed")
        name = f"cpuflow-{seed if isinstance(seed, int) else 'image'}-{image_id[:8]}.png"
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{name}"',
                                 "Cache-Control": "private, max-age=86400, immutable"})

    return app


# --- helpers -----------------------------------------------------------------------
def describe(mid: str, pipe: Any) -> dict:
    """What the page needs to know about a model (no paths)."""
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
        "taesd": "taesd_decoder" in components,     # exported with --taesd: decoder "taesd", full-size previews
        "deep_cache": "unet_deepcache_full" in components,   # exported with --deep-cache
        "random_weights": bool(getattr(m, "random_weights", False)),
        "model_hash": str(getattr(m, "model_hash", "")),
    }


def _build_request(body: GenerateBody, info: dict, limits: Limits) -> tuple[GenerationRequest, dict]:
    for name in ("prompt", "negative_prompt"):
        n = len(getattr(body, name))
        if n > min(limits.max_prompt_chars, MAX_PROMPT_CHARS):
            raise ResourceLimitError(f"{name} has {n} characters; this server's limit is {limits.max_prompt_chars}")
    if isinstance(body.n_samples, int) and body.n_samples > limits.max_samples:
        raise ResourceLimitError(f"n_samples {body.n_samples} is over this server's limit of {limits.max_samples}")
    if body.steps is not None and body.steps > limits.max_steps:
        raise ResourceLimitError(f"steps {body.steps} is over this server's limit of {limits.max_steps}")
    init_bytes = None
    width, height = body.width, body.height
    if body.init_image is not None:
        from ..image import load_init_image
        init_bytes = _decode_base64(body.init_image, limits.max_init_bytes)
        for name, v in (("width", width), ("height", height)):
            if v is not None and (isinstance(v, bool) or v <= 0 or v % 8):
                raise InvalidArgument(f"{name} must be a positive multiple of 8, got {v}")
        # bytes and a neutral name: no path is ever opened, none reaches an error message
        img = load_init_image(init_bytes, width, height, name="(uploaded)")
        width, height = img.size
    width = width if width is not None else info["width"]
    height = height if height is not None else info["height"]
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0 \
            and width * height > limits.max_pixels:
        raise ResourceLimitError(f"{width}x{height} = {width * height} pixels is over this server's limit "
                                 f"of {limits.max_pixels} pixels per image")
    req = GenerationRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                            sampler=body.sampler, schedule=body.schedule, guidance=body.guidance,
                            width=width, height=height, seed=body.seed, n_samples=body.n_samples,
                            eta=body.eta, init_image=init_bytes, strength=body.strength,
                            rng=body.rng, decoder=body.decoder, deep_cache=body.deep_cache).with_seed()
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
              "decoder": req.decoder, "deep_cache": req.deep_cache}
    return req, params


def _decode_base64(text: str, max_bytes: int) -> bytes:
    s = _DATA_URL_RE.sub("", text.strip(), count=1)
    if len(s) > (max_bytes * 4) // 3 + 4:
        raise ResourceLimitError(f"init image is over this server's limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        from ..errors import ImageInputError
        raise ImageInputError("init image is not valid base64") from None
    if not data:
        from ..errors import ImageInputError
        raise ImageInputError("init image is empty")
    return data


def _job(queue: JobQueue, job_id: str) -> Job:
    job = queue.get(job_id)
    if job is None:
        raise StarletteHTTPException(404)
    return job


async def _event_stream(job: Job, queue: JobQueue):
    """progress events while the job changes, then one final event named after its status."""
    last_version, last_preview = -1, None
    yield {"retry": 2000}
    while True:
        if job.version != last_version:
            data = job.to_json(position=queue.position(job))
            last_version = data["version"]
            if data["preview"] == last_preview:
                data["preview"] = None          # send each preview once
            else:
                last_preview = data["preview"]
            yield {"event": "progress", "data": json.dumps(data)}
            if data["status"] in ("done", "failed", "cancelled"):
                data["preview"] = None
                yield {"event": data["status"], "data": json.dumps(data)}
                return
        await asyncio.sleep(0.05)  # jobs change on the worker thread: poll their version


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "too_large",
                 415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests"}
_STATUS_MESSAGES = {404: "not found", 405: "method not allowed"}


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, secret_strings: tuple[str, ...]) -> None:
    @app.exception_handler(CpuflowError)
    async def cpuflow_error(_req, e: CpuflowError):
        return _error(e.http_status, e.code, scrub(str(e), secret_strings))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req, e: StarletteHTTPException):
        code = _STATUS_CODES.get(e.status_code, "error")
        msg = _STATUS_MESSAGES.get(e.status_code) or (e.detail if isinstance(e.detail, str) else code)
        return _error(e.status_code, code, scrub(str(msg), secret_strings), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, e: RequestValidationError):
        problems = []
        for err in e.errors()[:10]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")[:64] or "body"
            if err.get("type") == "extra_forbidden":
                problems.append(f"unknown field {loc!r}")
            elif err.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
            elif err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
                problems.append("the body must be a JSON object")
            else:
                problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(dict.fromkeys(problems)) or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(_req, _e: Exception):
        resp = _error(500, "internal_error", "internal error (see the server log)")
        for k, v in security_headers():
            resp.headers[k.decode()] = v.decode()
        return resp


def _load_page() -> tuple[str, str]:
    """The page and its CSP: inline <script>/<style> are allowed by their sha256 only."""
    html = PAGE.read_text(encoding="utf-8")
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        hashes[tag] = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                               for b in blocks) or "'none'"
    csp = ("default-src 'none'; "
           f"script-src {hashes['script']}; style-src {hashes['style']}; "
           "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
           "frame-ancestors 'none'")
    return html, csp
