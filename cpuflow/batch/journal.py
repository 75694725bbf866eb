"""The output folder of a batch, and the journal that makes it exactly-once.

``DIR/`` holds::

    batch.json       what made these images (model hash, backend, precision, variant):
                     a rerun with something else is refused, never mixed in
    journal.jsonl    one line per finished job, {"id", "status": "done"|"failed", ...};
                     append-only, fsync'd: the commit record
    results.jsonl    one line per finished job for people and tools: parameters, file, seconds
    images/<id>.png  the images, named by job id (first 20 hex digits), written atomically
                     with their parameters (and the job id) in the PNG text chunks
    .lock            held while a batch writes here: two drivers never share a folder

A finished image is committed in this order: the PNG (temp file, fsync, rename),
its results line, its journal line. A crash (SIGKILL included) between any two
leaves something :meth:`OutputDir.open` repairs: a torn last line is cut off;
an image (or results line) without its journal line is adopted, not made again;
a half-written temp PNG is removed. So every job is in the journal once, every
image is written once, and a rerun finishes exactly the jobs that are missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CpuflowError, InvalidArgument
from ..image import fsync_dir, read_png_metadata, save_png_atomic

JOURNAL = "journal.jsonl"
RESULTS = "results.jsonl"
CONFIG = "batch.json"
IMAGES = "images"
ID_CHARS = 20


def image_name(job_id: str) -> str:
    return f"{job_id[:ID_CHARS]}.png"


class OutputDir:
    """An open batch folder: the jobs already finished, and the one way to finish another."""

    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = Path(root)
        self.config = config
        self.done: dict[str, dict] = {}       # id -> journal entry (status done)
        self.failed: dict[str, dict] = {}     # id -> journal entry (status failed)
        self._lock_fd: int | None = None
        self._journal = None
        self._results = None
        self._result_ids: set[str] = set()    # ids with a "done" line in results.jsonl

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike, config: dict[str, Any]) -> "OutputDir":
        out = cls(Path(root), config)
        try:
            out._open()
        except BaseException:
            out.close()
            raise
        return out

    def _open(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise InvalidArgument(f"--out {str(root)!r} exists and is not a folder")
        (root / IMAGES).mkdir(parents=True, exist_ok=True)
        self._lock()
        self._check_config()
        for tmp in (root / IMAGES).glob(".*.tmp"):   # a PNG killed half-way (save_png_atomic's temp)
            tmp.unlink(missing_ok=True)
        for name in (JOURNAL, RESULTS):
            _cut_torn_line(root / name)
        for entry in _read_lines(root / JOURNAL):
            (self.done if entry.get("status") == "done" else self.failed)[entry["id"]] = entry
            if entry.get("status") == "done":
                self.failed.pop(entry["id"], None)
        self._result_ids = {e["id"] for e in _read_lines(root / RESULTS) if e.get("status") == "done"}
        self._journal = open(root / JOURNAL, "a", encoding="utf-8")
        self._results = open(root / RESULTS, "a", encoding="utf-8")
        fsync_dir(root)

    def _lock(self) -> None:
        import fcntl
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CpuflowError(f"another cpuflow batch is writing {str(self.root)!r}",
                               hint="wait for it, or use another --out") from None
        self._lock_fd = fd

    def _check_config(self) -> None:
        path = self.root / CONFIG
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CpuflowError(f"{path} cannot be read: {e}", hint="use another --out") from None
            diff = [k for k in self.config if old.get(k) != self.config[k]]
            if diff:
                k = diff[0]
                raise InvalidArgument(
                    f"{str(self.root)!r} holds images made with {k} {old.get(k)!r}, this run has {self.config[k]!r}",
                    hint="use another --out, or the same settings to finish that batch")
            return
        tmp = path.with_name(CONFIG + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- state ---------------------------------------------------------------
    def is_finished(self, job_id: str, *, retry_failed: bool = False) -> bool:
        return job_id in self.done or (job_id in self.failed and not retry_failed)

    def image_path(self, job_id: str) -> Path:
        return self.root / IMAGES / image_name(job_id)

    def adopt(self, job) -> bool:
        """A job whose image reached the disk but not the journal (killed in between):
        journal it from the file, do not make it again. True when adopted."""
        path = self.image_path(job.id)
        if not path.exists():
            return False
        try:
            meta = read_png_metadata(path)
        except CpuflowError:
            meta = {}
        if meta.get("batch_job") != job.id:   # not ours (or unreadable): make it again, atomically
            return False
        self._commit_done(job, path, {k: v for k, v in meta.items()}, seconds=None, worker=None)
        return True

    # -- committing ----------------------------------------------------------
    def write_done(self, job, image, record: dict, *, seconds: float | None, worker: str | None) -> Path:
        """Write the image with its parameters (atomically), then commit it."""
        record = dict(record, batch_job=job.id)
        path = save_png_atomic(image, self.image_path(job.id), record)
        self._commit_done(job, path, record, seconds=seconds, worker=worker)
        return path

    def _commit_done(self, job, path: Path, record: dict, *, seconds, worker) -> None:
        rel = str(path.relative_to(self.root))
        if job.id not in self._result_ids:
            self._append(self._results, {"id": job.id, "status": "done", "file": rel, "source": job.source,
                                         "params": job.params, "record": _jsonable(record),
                                         "seconds": None if seconds is None else round(seconds, 4),
                                         "worker": worker})
            self._result_ids.add(job.id)
        entry = {"id": job.id, "status": "done", "file": rel}
        self._append(self._journal, entry)
        self.done[job.id] = entry
        self.failed.pop(job.id, None)

    def write_failed(self, job, error: str, *, worker: str | None = None) -> None:
        self._append(self._results, {"id": job.id, "status": "failed", "error": error, "source": job.source,
                                     "params": job.params, "worker": worker})
        entry = {"id": job.id, "status": "failed", "error": error}
        self._append(self._journal, entry)
        self.failed[job.id] = entry

    @staticmethod
    def _append(f, obj: dict) -> None:
        # One write of one whole line, then fsync: after a crash the file ends with
        # complete lines, or with one torn line that the next open cuts off.
        f.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        for f in (self._journal, self._results):
            if f is not None:
                f.close()
        self._journal = self._results = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # releases the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cut_torn_line(path: Path) -> None:
    """Drop an incomplete last line (the process died inside a write)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            out.append(obj)
    return out


def _jsonable(record: dict) -> dict:
    return json.loads(json.dumps(record, default=str))
