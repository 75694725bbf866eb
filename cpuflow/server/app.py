"""The FastAPI application: one page and a JSON API.

Routes (all JSON errors are ``{"error": {"code": ..., "message": ...}}``)::

    GET    /                        the page (inline CSS/JS, nothing from outside)
    GET    /api/models              models (server-made ids), samplers, limits
    GET    /api/embeddings          the textual-inversion embeddings requests may name (their words)
    POST   /api/generate            202 {job}; 413 caps; 415 not JSON; 422 bad input; 429 queue full
    POST   /api/upscale             202 {job}: a gallery image (by its id) through an x4 upscaler model
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
import hashlib
import json
import re
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import SCHEDULES
from ..errors import CpuflowError, InvalidArgument
from .jobs import ImageStore, Job, JobQueue, QueueFull, scrub
from .request import (GenerateBody, Limits, ParamsFromImageBody, UpscaleBody, build_upscale, decode_base64,
                      describe, validation_problems)
from .request import build_request as _build_request
from .runner import make_runner
from .security import SecurityMiddleware, default_allowed_hosts, security_headers

PAGE = Path(__file__).with_name("page.html")
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def create_app(models: Mapping[str, Any], *, token: str | None = None, allowed_hosts=None, port: int = 7860,
               max_queue: int | None = None, limits: Limits | None = None, load_options: dict | None = None,
               preview_every: int | None = None, embeddings=(), embeddings_dir=None) -> FastAPI:
    """``models``: id -> exported model folder, ``None`` (the shipped model) or a
    loaded :class:`cpuflow.Pipeline`. ``allowed_hosts``: exact Host header values
    (default: localhost / 127.0.0.1 / [::1] with ``port``). ``embeddings``:
    textual-inversion files (FILE or FILE:TOKEN) a request may name; ``embeddings_dir``:
    a folder whose .pt / .safetensors / .bin files are added (cpuflow.embeddings.embedding_files).
    All are read now, so a bad file stops the server from starting, and no request
    ever names a path: a request names an embedding by its word, looked up here."""
    limits = limits or Limits()
    embedding_specs, embedding_infos = _load_embeddings(embeddings, embeddings_dir)
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
    default_model = next((mid for mid, info in infos.items() if not info["upscaler"]), next(iter(pipes)))
    from ..embeddings import split_spec
    embedding_paths = [str(split_spec(spec)[0]) for spec in embedding_specs.values()]
    secret_strings = tuple(s for s in [token, *paths, *embedding_paths] if s)

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
                "schedules": list(SCHEDULES),
                "embeddings": sorted(embedding_specs),
                "limits": {"max_pixels": limits.max_pixels, "max_steps": limits.max_steps,
                           "max_samples": limits.max_samples, "max_prompt_chars": limits.max_prompt_chars,
                           "max_init_bytes": limits.max_init_bytes, "max_queue": limits.max_queue}}

    @app.get("/api/embeddings", summary="Textual-inversion embeddings a request may use (by word)")
    def list_embeddings():
        return {"embeddings": embedding_infos}

    @app.post("/api/generate", status_code=202, summary="Queue a generation; returns the job")
    def generate(body: GenerateBody):
        model_id = body.model if body.model is not None else default_model
        if model_id not in pipes:
            raise InvalidArgument(f"model must be one of {', '.join(pipes)} (see /api/models)")
        if infos[model_id]["upscaler"]:
            raise InvalidArgument(f"model {model_id} is an x4 upscaler: it upscales gallery images "
                                  "(POST /api/upscale), it does not generate")
        req, params = _build_request(body, infos[model_id], limits, embedding_specs=embedding_specs)
        check = getattr(pipes[model_id], "check", None)   # a real Pipeline: refuse what would fail later
        if check is not None:
            check(req)
        job = Job(model_id=model_id, request=req, params=params, n_images=req.n_samples)
        return _submit(queue, job)

    @app.post("/api/params-from-image", summary="Generation parameters read from a PNG (cpuflow's or A1111's)")
    def params_from_image(body: ParamsFromImageBody):
        from ..from_image import params_from_png
        params, notes = params_from_png(decode_base64(body.image, limits.max_init_bytes, what="image"))
        return {"params": params, "notes": notes}

    @app.post("/api/upscale", status_code=202, summary="Queue a 4x upscale of a finished image; returns the job")
    def upscale(body: UpscaleBody):
        upscalers = [mid for mid, info in infos.items() if info["upscaler"]]
        if not upscalers:
            raise InvalidArgument("this server has no x4 upscaler model (start it with --model exported/x4 too)")
        model_id = body.model if body.model is not None else upscalers[0]
        if model_id not in upscalers:
            raise InvalidArgument(f"model must be an upscaler: one of {', '.join(upscalers)} (see /api/models)")
        item = store.get(body.image)
        if item is None:
            raise StarletteHTTPException(404)
        png, record = item
        req, params = build_upscale(body, png, record, infos[model_id], limits)
        job = Job(model_id=model_id, request=req, params=params, n_images=1)
        return _submit(queue, job)

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
def _submit(queue: JobQueue, job: Job) -> JSONResponse:
    """Queue a job: 202 with where to follow it, or 429 with Retry-After when the queue is full."""
    try:
        pos = queue.submit(job)
    except QueueFull as e:
        return _error(429, e.code, str(e), headers={"Retry-After": str(e.retry_after)})
    return JSONResponse(job.to_json(position=pos), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})


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


def _load_embeddings(specs, directory) -> tuple[dict[str, str], list[dict]]:
    """word -> file spec, and what GET /api/embeddings says of each (no paths)."""
    from ..embeddings import embedding_files, load_embedding
    all_specs = list(specs) + (embedding_files(directory) if directory is not None else [])
    by_word: dict[str, str] = {}
    infos = []
    for spec in all_specs:
        e = load_embedding(spec)
        if e.name in by_word:
            raise InvalidArgument(f"two embeddings are called {e.name!r} ({by_word[e.name]} and {spec}); "
                                  "rename one, or give one a word with --embedding FILE:TOKEN")
        by_word[e.name] = spec
        infos.append({"name": e.name, "vectors": e.n_vectors,
                      "widths": {part or "text_encoder": int(v.shape[1]) for part, v in e.parts.items()}})
    return by_word, sorted(infos, key=lambda i: i["name"])


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
        return _error(422, "invalid_request", validation_problems(e.errors()))

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
