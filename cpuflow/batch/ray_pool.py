"""Running jobs on a Ray cluster: one actor per worker slot, each holding the
loaded, compiled model; jobs go to whichever actor has room (at most two
queued per actor, so faster workers take more). The driver keeps the journal
and writes every file (:mod:`cpuflow.batch.runner`), so resuming works exactly
as it does locally.

Faults: an actor that dies (its process killed, its node lost) fails its
queued calls with a Ray actor error; those jobs go back to the queue and run on
another actor, and a fresh actor replaces the dead one (at most as many
replacements as workers). A job that has been on ``MAX_ATTEMPTS`` dying actors
is recorded as failed (it may be what kills them). Bad input never kills an
actor: it comes back as a failed outcome (:func:`cpuflow.batch.worker.run_job`).
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

from ..errors import CpuflowError, MissingDependency, ModelError
from . import model_transfer
from .worker import Outcome

MAX_ATTEMPTS = 3
INSTALL_HINT = "pip install 'cpuflow[ray]'"


def import_ray(address: str | None = None):
    try:
        import ray
    except ImportError:
        raise MissingDependency("--ray needs Ray, which is not installed", hint=INSTALL_HINT) from None
    if address is not None and str(address).startswith("ray://"):
        try:
            import grpc  # noqa: F401  (the Ray Client speaks gRPC; `pip install ray` alone lacks it)
        except ImportError:
            raise MissingDependency("--ray ray://... connects through the Ray Client, which needs grpcio",
                                    hint=INSTALL_HINT) from None
    return ray


class _Worker:
    """The actor (wrapped by ``ray.remote`` in :class:`RayPool`)."""

    def __init__(self):
        self.pipe = None

    def prepare(self, model_dir: str, sha: str, files: dict | None, mode: str, uri: str | None = None) -> dict:
        """Find or fetch the model on this node. Returns {"ok": bool, "path": ..., "pid": ...}."""
        import os

        import ray

        from .worker import worker_name
        if uri is not None:
            path = str(model_transfer.fetch_uri(uri, sha))
        elif files is None:
            if mode == "ship" or not model_transfer.shared_ok(model_dir, sha):
                return {"ok": False, "worker": worker_name(), "pid": os.getpid()}
            path = model_dir
        else:
            path = str(model_transfer.unpack(files, sha, ray.get))
        return {"ok": True, "path": path, "worker": worker_name(), "pid": os.getpid()}

    def load(self, load_options: dict, sha: str) -> None:
        from .model_transfer import manifest_sha256
        from .worker import load_pipeline
        self.pipe = load_pipeline(dict(load_options, verify="sha256"))
        if manifest_sha256(self.pipe.manifest.root) != sha:   # raced with a re-export on this node
            raise CpuflowError("the model on this node changed while it was loaded")

    def run(self, job_id: str, request) -> Outcome:
        from .worker import run_job
        return run_job(self.pipe, job_id, request)


# ray.init installs Python SIGTERM / SIGINT handlers in the driver and leaves them after
# ray.shutdown. A caller's process (cpuflow.batch.run from Python, a test session) then
# keeps them: a process it forks later inherits a SIGTERM handler that cannot run while the
# child is blocked in C, so terminate() no longer stops that child and joining it hangs.
# So the handlers the caller had are put back when the pool that started Ray closes.
_SIGNALS = ("SIGTERM", "SIGINT")


def _signal_handlers() -> dict:
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {name: signal.getsignal(getattr(signal, name)) for name in _SIGNALS if hasattr(signal, name)}


def _restore_signal_handlers(saved: dict) -> None:
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    for name, handler in saved.items():
        if handler is not None:
            try:
                signal.signal(getattr(signal, name), handler)
            except (ValueError, OSError, TypeError):
                pass


# The Ray Client server starts one "specific server" process per client connection. On a head
# that is still coming up (`ray start` returns, or its port opens, before its node is ready)
# that process can exit at once; the client then gets this message. Connecting again a few
# seconds later works, so such a failure is retried; every other failure is reported at once.
TRANSIENT_CLIENT_FAILURE = "Starting Ray client server failed"
CONNECT_ATTEMPTS = 3
CONNECT_BACKOFF_S = 2.0


def connect(ray, address: str, *, attempts: int = CONNECT_ATTEMPTS, backoff_s: float = CONNECT_BACKOFF_S,
            sleep=None) -> None:
    """``ray.init`` on ``address``, retrying a Ray Client server that failed to start its
    per-client process; a cluster it cannot reach is one CpuflowError with a hint."""
    import time
    sleep = sleep or time.sleep
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
            return
        except ConnectionError as e:
            if TRANSIENT_CLIENT_FAILURE in str(e) and attempt < attempts:
                if ray.is_initialized():
                    ray.shutdown()
                sleep(backoff_s * attempt)
                continue
            # a Ray Client server that wants a token it was not sent also looks like a timeout
            hint = ("check the address and that the head runs the Ray Client server (`ray start --head "
                    "--ray-client-server-port 10001`); a cluster with token authentication needs "
                    "RAY_AUTH_MODE=token here, with its token" if str(address).startswith("ray://") else
                    "start one with `ray start --head`, or check the address")
            tried = f" (tried {attempt} times)" if attempt > 1 else ""
            raise CpuflowError(f"cannot reach the Ray cluster at {address}{tried}: {e}", hint=hint) from None


class RayPool:
    def __init__(self, address: str, load_options: dict, model_dir, *, workers: int | None,
                 cpus_per_worker: int, model_transfer_mode: str = "auto", model_uri: str | None = None,
                 on_event=None):
        ray = import_ray(address)
        self.ray = ray
        self.on_event = on_event or (lambda ev: None)
        self.started_ray = False
        self._signals = _signal_handlers()
        if not ray.is_initialized():
            connect(ray, address)
            self.started_ray = True
        self.cpus = cpus_per_worker
        if workers is None:
            total = int(ray.cluster_resources().get("CPU", 0))
            workers = max(1, total // cpus_per_worker)
        self.workers = workers
        self.replacements = workers
        self.model_dir = str(model_dir)
        self.sha = model_transfer.manifest_sha256(model_dir)
        self.mode = model_transfer_mode
        self.uri = model_uri
        self.load_options = dict(load_options, threads=load_options.get("threads") or cpus_per_worker)
        self.actor_cls = ray.remote(num_cpus=cpus_per_worker, max_restarts=0, max_task_retries=0)(_Worker)
        self._files = None
        self.actors: list = []
        try:
            self.actors = self._start(workers)
        except BaseException:
            self.close()
            raise

    # -- actors --------------------------------------------------------------
    def _start(self, n: int) -> list:
        ray = self.ray
        actors = [self.actor_cls.remote() for _ in range(n)]
        infos = self._get([a.prepare.remote(self.model_dir, self.sha, None, self.mode, self.uri) for a in actors])
        need = [i for i, info in enumerate(infos) if not info["ok"]]
        if need and self.mode == "shared":
            raise ModelError(f"worker {infos[need[0]]['worker']} does not see the model folder {self.model_dir} "
                             "(or sees a different export there)",
                             hint="put the folder at the same path on every node, or use --model-transfer ship")
        if need:
            if self._files is None:   # read the folder once; every node copies from the object store
                self._files = model_transfer.pack(self.model_dir, ray.put)
            for i, info in zip(need, self._get([actors[i].prepare.remote(self.model_dir, self.sha, self._files,
                                                                          self.mode) for i in need])):
                infos[i] = info
        self._get([a.load.remote(dict(self.load_options, model=info["path"]), self.sha)
                   for a, info in zip(actors, infos)])
        for info in infos:
            self.on_event({"event": "worker", "worker": info["worker"], "pid": info["pid"],
                           "shipped": info["path"] != self.model_dir, "path": info["path"]})
        return actors

    def _get(self, refs):
        """ray.get, with a worker's CpuflowError (a damaged model, a bad URI) raised as itself."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, CpuflowError):
                raise cause from None
            raise

    def _replace(self, dead) -> None:
        self.actors = [a for a in self.actors if a is not dead]
        try:
            self.ray.kill(dead, no_restart=True)
        except Exception:
            pass
        if self.replacements > 0:
            self.replacements -= 1
            try:
                self.actors += self._start(1)
            except Exception as e:   # the cluster may be short of room: go on with fewer
                self.on_event({"event": "warning", "message": f"could not start a replacement worker: {e}"})
        if not self.actors:
            raise CpuflowError("every Ray worker died; finished images are kept",
                               hint="check the workers' memory and logs, then rerun the same command")

    # -- jobs ----------------------------------------------------------------
    def run(self, jobs) -> Iterator[Outcome]:
        ray = self.ray
        queue = deque(jobs)
        attempts: dict[str, int] = {}
        inflight: dict = {}          # ref -> (job, actor)
        load = {id(a): 0 for a in self.actors}

        def fill():
            for a in self.actors:
                load.setdefault(id(a), 0)
            progress = True
            while queue and progress:
                progress = False
                for a in sorted(self.actors, key=lambda a: load[id(a)]):
                    if not queue or load[id(a)] >= 2:
                        continue
                    job = queue.popleft()
                    inflight[a.run.remote(job.id, job.request)] = (job, a)
                    load[id(a)] += 1
                    progress = True

        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            job, actor = inflight.pop(ref)
            load[id(actor)] = max(0, load.get(id(actor), 1) - 1)
            try:
                outcome = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                n = attempts[job.id] = attempts.get(job.id, 0) + 1
                self.on_event({"event": "requeued", "job": job.id, "attempt": n})
                if n >= MAX_ATTEMPTS:
                    yield Outcome(job.id, error=f"the worker died {n} times running this job "
                                                f"(last: {type(e).__name__})")
                else:
                    queue.appendleft(job)
                if any(a is actor for a in self.actors):
                    # every call still queued on the dead actor fails the same way; requeue them as they come
                    self._replace(actor)
            except ray.exceptions.RayTaskError as e:
                yield Outcome(job.id, error=str(getattr(e, "cause", None) or e).splitlines()[0])
            else:
                yield outcome
            fill()

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
            _restore_signal_handlers(self._signals)
