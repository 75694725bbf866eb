"""Batch jobs: where they come from, what they resolve to, and who they are.

A job makes exactly one image. Its **identity** is the sha256 of its resolved
parameters (the model's defaults filled in, the seed concrete, the init image
by the sha256 of its bytes, the model hash): the same job written twice, or the
same command run twice, is the same id, so the journal can skip it.

Each JSONL line is the JSON ``POST /api/generate`` takes, read by the same
schema and checks (:mod:`cpuflow.server.request`), plus ``init_image_path``
(relative paths are read from the jobs file's folder) where the API takes
base64 bytes. A line with ``n_samples`` N becomes N jobs with seeds seed,
seed+1, ... (the images ``cpuflow generate --n-samples N`` makes). Bad lines
become failed jobs (with their error), never a stopped batch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from ..config import MAX_PIXELS, MAX_PROMPT_CHARS, MAX_SAMPLES, MAX_SEED, MAX_STEPS, GenerationRequest
from ..errors import CpuflowError, InvalidArgument

#: A batch is bounded by the runtime's own caps, not the HTTP server's stricter ones.
MAX_INIT_BYTES = 64 * 1024 * 1024
#: Jobs a single command may expand to (a typo like --seeds 0..1e9 is refused, not run).
MAX_JOBS = 10_000_000


@dataclass(frozen=True)
class BatchJob:
    id: str                                 # sha256 of the resolved parameters (hex)
    source: str                             # where it came from: "jobs.jsonl:12", "prompts.txt:3"
    params: dict[str, Any]                  # resolved, JSON-safe: what the id hashes
    request: GenerationRequest | None       # one image, every field concrete; None: bad input
    error: str | None = None                # bad input: recorded as failed, never run


class BadLine(NamedTuple):
    """A line that is not JSON: kept as text, so its failed job has a stable identity."""
    text: str
    error: CpuflowError


def batch_limits():
    from ..server.request import Limits
    return Limits(max_pixels=MAX_PIXELS, max_steps=MAX_STEPS, max_samples=MAX_SAMPLES,
                  max_prompt_chars=MAX_PROMPT_CHARS, max_init_bytes=MAX_INIT_BYTES)


def _body_class():
    from ..server.request import GenerateBody

    class BatchJobBody(GenerateBody):
        """A JSONL line: the API's fields plus an init image read from a file."""
        init_image_path: str | None = None

    return BatchJobBody


def parse_seeds(text: str | None) -> list[int] | None:
    """``"A..B"`` (inclusive) or ``"A"``; None stays None."""
    if text is None:
        return None
    s = str(text).strip()
    try:
        a, _, b = s.partition("..")
        lo, hi = int(a), int(b) if b else int(a)
    except ValueError:
        raise InvalidArgument(f"--seeds must be A..B or A (whole numbers), got {text!r}") from None
    if not 0 <= lo <= hi <= MAX_SEED:
        raise InvalidArgument(f"--seeds must satisfy 0 <= A <= B <= {MAX_SEED}, got {text!r}")
    if hi - lo + 1 > MAX_JOBS:
        raise InvalidArgument(f"--seeds {text} makes {hi - lo + 1} seeds; the limit is {MAX_JOBS}")
    return list(range(lo, hi + 1))


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, parsed object or CpuflowError) for every non-blank line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(f"jobs file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"jobs file {str(path)!r} cannot be read: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        source = f"{Path(path).name}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield source, BadLine(line, InvalidArgument(f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        yield source, obj


def read_prompts(path: Path, params: dict) -> Iterator[tuple[str, Any]]:
    """One job body per non-blank line of a prompts file, the other fields from ``params``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidArgument(f"prompts file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"prompts file {str(path)!r} cannot be read: {e}") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield f"{Path(path).name}:{n}", dict(params, prompt=line.strip())


def make_jobs(bodies: Iterable[tuple[str, Any]], info: dict, *, seeds: list[int] | None = None,
              base_dir: Path | None = None) -> list[BatchJob]:
    """Validate and expand job bodies. ``info``: :func:`cpuflow.server.request.describe`
    of the loaded model (its defaults and abilities). ``seeds``: every body without
    its own seed is made once per seed."""
    body_cls = _body_class()
    limits = batch_limits()
    jobs: list[BatchJob] = []
    for source, obj in bodies:
        try:
            for job in _jobs_of(source, obj, info, seeds, base_dir, body_cls, limits):
                jobs.append(job)
                if len(jobs) > MAX_JOBS:
                    raise InvalidArgument(f"the batch has more than {MAX_JOBS} jobs; split it")
        except CpuflowError as e:
            if len(jobs) > MAX_JOBS:
                raise
            jobs.append(_failed_job(source, obj.text if isinstance(obj, BadLine) else obj, str(e)))
    return jobs


def _jobs_of(source, obj, info, seeds, base_dir, body_cls, limits) -> Iterator[BatchJob]:
    from pydantic import ValidationError

    from ..server.request import build_request, validation_problems
    if isinstance(obj, BadLine):
        raise obj.error
    if not isinstance(obj, dict):
        raise InvalidArgument("a job must be a JSON object")
    try:
        body = body_cls.model_validate(obj)
    except ValidationError as e:
        raise InvalidArgument(validation_problems(e.errors())) from None
    if body.model is not None:
        raise InvalidArgument("a batch runs one model (--model); remove \"model\" from the job")
    init_bytes = None
    if body.init_image_path is not None:
        if body.init_image is not None:
            raise InvalidArgument("give init_image (base64) or init_image_path, not both")
        init_bytes = _read_init(body.init_image_path, base_dir)
    if body.seed is not None:
        job_seeds = [body.seed]
    elif seeds is not None:
        job_seeds = seeds
    else:
        raise InvalidArgument("the job has no seed: add \"seed\" to it or pass --seeds A..B, "
                              "so that a rerun makes the same images")
    for seed in job_seeds:
        req, params = build_request(body.model_copy(update={"seed": seed}), info, limits, init_bytes)
        for k in range(req.n_samples):
            # image k of a request is the image of the same request with seed+k (pipelines/generate.py)
            one = replace(req, seed=(req.seed + k) % (MAX_SEED + 1), n_samples=1, sampler=params["sampler"],
                          steps=params["steps"], guidance=params["guidance"])
            yield _job(source, one, info)


def _read_init(path_text: str, base_dir: Path | None) -> bytes:
    p = Path(path_text).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    from ..image import _open_source
    fp, _label, _close = _open_source(p, None)   # the same checks (exists, regular file, not empty)
    with fp:
        data = fp.read(MAX_INIT_BYTES + 1)
    if len(data) > MAX_INIT_BYTES:
        raise InvalidArgument(f"init image {str(p)!r} is over {MAX_INIT_BYTES} bytes")
    return data


def resolved_params(req: GenerationRequest, info: dict) -> dict[str, Any]:
    """What makes the image, JSON-safe: the job's identity is the hash of this."""
    img2img = req.init_image is not None
    return {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
        "sampler": req.sampler, "schedule": req.schedule, "steps": req.steps, "guidance": req.guidance,
        "width": req.width, "height": req.height, "eta": req.eta, "rng": req.rng, "decoder": req.decoder,
        "strength": req.strength if img2img else None,
        "init_image_sha256": hashlib.sha256(req.init_image).hexdigest() if img2img else None,
        "model_hash": info["model_hash"],
    } | ({"resize": req.resize} if img2img else {})   # only img2img jobs: txt2img job ids stay what they were


def job_id(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _job(source: str, req: GenerationRequest, info: dict) -> BatchJob:
    params = resolved_params(req, info)
    return BatchJob(id=job_id(params), source=source, params=params, request=req)


def _failed_job(source: str, raw: Any, error: str) -> BatchJob:
    # A bad job's identity is its content: the same bad line is the same failed job on a rerun.
    text = json.dumps(raw, sort_keys=True, ensure_ascii=True, default=str)
    return BatchJob(id=job_id({"bad_input": text}), source=source, params={"input": raw}, request=None, error=error)
