"""Jobs: one worker thread, a bounded queue, cancellation, and the image store.

* :class:`JobQueue` runs one job at a time on its own thread (the backends use
  every core for one image; two at once would only be slower). ``submit``
  refuses with :class:`QueueFull` (HTTP 429 + Retry-After) when ``max_queue``
  jobs are already waiting.
* Cancelling a queued job removes it; cancelling a running one sets its
  ``cancel`` event, which the progress callback checks after every sampler
  step and answers by raising :class:`cpuflow.errors.Cancelled`: the job stops
  within one step, stores no image, and the worker takes the next job.
* :class:`ImageStore` keeps finished PNGs in memory under random ids
  (``secrets.token_urlsafe``); nothing is ever looked up by a name a client made.
"""
from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Cancelled, CpuflowError

log = logging.getLogger("cpuflow.server")

ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")   # secrets.token_urlsafe(16)
FINISHED = ("done", "failed", "cancelled")

# Absolute paths (POSIX, ~/, Windows) in exception text: never sent to a client.
_PATH_RE = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:[\\/]|~[\\/]|/)(?:[^\s'\"<>|,;()]+)")


def new_id() -> str:
    return secrets.token_urlsafe(16)


def scrub(text: str, secret_strings: tuple[str, ...] = ()) -> str:
    """Remove filesystem paths and known secrets from a message meant for a client."""
    for s in secret_strings:
        if s:
            text = text.replace(s, "<hidden>")
    return _PATH_RE.sub("<path>", text)[:2000]


class QueueFull(CpuflowError):
    http_status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    model_id: str
    request: Any                      # cpuflow.config.GenerationRequest (seed already resolved)
    params: dict                      # what the client asked for, resolved, for display / "use again"
    id: str = field(default_factory=new_id)
    status: str = "queued"            # queued | running | done | failed | cancelled
    step: int = 0
    n_steps: int = 0
    image: int = 0
    n_images: int = 1
    preview: str | None = None        # data: URL of a small PNG
    preview_step: int = 0
    images: list = field(default_factory=list)     # [{"id", "url", "seed", "record"}]
    warnings: list = field(default_factory=list)
    error: dict | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0                  # bumped on every change (the event stream watches it)
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes: Any) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(self, k, v)
            self.version += 1

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def to_json(self, *, position: int | None = None, preview: bool = True) -> dict:
        with self.lock:
            done_steps = self.image * self.n_steps + self.step
            total = max(1, self.n_images * self.n_steps)
            return {
                "id": self.id,
                "status": self.status,
                "model": self.model_id,
                "params": dict(self.params),
                "position": position,
                "cancel_requested": self.cancel.is_set() and not self.is_finished,
                "progress": {"step": self.step, "n_steps": self.n_steps, "image": self.image,
                             "n_images": self.n_images,
                             "fraction": 1.0 if self.status == "done" else round(min(done_steps / total, 1.0), 4)},
                "preview": self.preview if preview else None,
                "preview_step": self.preview_step,
                "images": [dict(i) for i in self.images],
                "warnings": list(self.warnings),
                "error": self.error,
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "version": self.version,
            }


class JobQueue:
    """A bounded FIFO of jobs and the one thread that runs them."""

    def __init__(self, run: Callable[[Job], None], *, max_queue: int = 8, keep_jobs: int = 200,
                 secret_strings: tuple[str, ...] = ()):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self._run = run
        self.max_queue = max_queue
        self.keep_jobs = keep_jobs
        self._secrets = secret_strings
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._cv = threading.Condition()
        self._durations: deque[float] = deque(maxlen=20)
        self._stopping = False
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="cpuflow-worker", daemon=True)
        self._thread.start()

    # -- client side ----------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue a job; returns its position (0 = next). Raises QueueFull."""
        with self._cv:
            if len(self._pending) >= self.max_queue and (self.current is not None or self._pending):
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); try again later",
                                retry_after=self.retry_after())
            self._pending.append(job)
            self._jobs[job.id] = job
            self._prune()
            self._cv.notify()
            return len(self._pending) - 1

    def get(self, job_id: str) -> Job | None:
        if not isinstance(job_id, str) or not ID_RE.match(job_id):
            return None
        with self._cv:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cv:
            return list(self._jobs.values())

    def position(self, job: Job) -> int | None:
        with self._cv:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    def cancel(self, job: Job) -> None:
        with self._cv:
            job.cancel.set()
            if job in self._pending:
                self._pending.remove(job)
                job.update(status="cancelled", finished=time.time(),
                           error={"code": "cancelled", "message": "cancelled before it started"})
            else:
                job.update()  # wake the event stream: cancel_requested is now true

    def retry_after(self) -> int:
        avg = sum(self._durations) / len(self._durations) if self._durations else 10.0
        return int(min(3600, max(1, math.ceil(avg * (len(self._pending) + 1)))))

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            for job in list(self._pending):
                job.cancel.set()
            if self.current is not None:
                self.current.cancel.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    # -- worker side ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self.current = job
            try:
                self._execute(job)
            finally:
                with self._cv:
                    self.current = None

    def _execute(self, job: Job) -> None:
        t0 = time.time()
        job.update(status="running", started=t0)
        try:
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            self._run(job)
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            job.update(status="done", finished=time.time())
        except Cancelled:
            job.update(status="cancelled", finished=time.time(), images=[],
                       error={"code": "cancelled", "message": "cancelled; no image was kept"})
        except CpuflowError as e:
            job.update(status="failed", finished=time.time(), images=[],
                       error={"code": e.code, "message": scrub(str(e), self._secrets)})
        except Exception:  # a bug or a backend crash: the log gets the trace, the client does not
            log.exception("job %s failed", job.id)
            job.update(status="failed", finished=time.time(), images=[],
                       error={"code": "internal_error",
                              "message": "generation failed with an internal error (see the server log)"})
        self._durations.append(time.time() - t0)

    def _prune(self) -> None:
        extra = len(self._jobs) - self.keep_jobs
        if extra <= 0:
            return
        for jid in [j.id for j in self._jobs.values() if j.is_finished][:extra]:
            del self._jobs[jid]


class ImageStore:
    """Finished PNGs in memory, under server-made random ids, oldest evicted first."""

    def __init__(self, max_images: int = 256, max_bytes: int = 512 * 1024 * 1024):
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, dict]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes, record: dict) -> str:
        image_id = new_id()
        with self._lock:
            self._items[image_id] = (png, record)
            self._bytes += len(png)
            while self._items and (len(self._items) > self.max_images or self._bytes > self.max_bytes):
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return image_id

    def get(self, image_id: str) -> tuple[bytes, dict] | None:
        if not isinstance(image_id, str) or not ID_RE.match(image_id):
            return None
        with self._lock:
            return self._items.get(image_id)
