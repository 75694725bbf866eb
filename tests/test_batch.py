"""`cpuflow batch` on this machine: jobs read like the HTTP API reads them, images equal to
`cpuflow generate`'s, exactly once through Ctrl-C, SIGKILL and reruns (the shipped model)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_batch import PROMPTS, STEPS, generate_reference, journal, pixels, write_jobs

import cpuflow.batch
from cpuflow.cli import main
from cpuflow.image import read_png_metadata


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batch-ref")


def test_jobs_are_read_like_the_api_and_bad_ones_fail_alone(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:1], [3], extra_lines=[
        '{"prompt": "x", "seed": 1, "steps": 2, "colour": "red"}',      # unknown field (the API: 422)
        '{"prompt": "x", "seed": 1, "steps": "2"}',                        # strict types, as the API
        '{"prompt": "x", "steps": 2}',                                     # no seed: not reproducible
        '{"prompt": "x", "seed": 1, "width": 60}',                         # the runtime's own check
        '{"prompt": "x", "seed": 1, "init_image_path": "missing.png"}',
        'not json',
        json.dumps({"prompt": PROMPTS[0], "seed": 3, "steps": STEPS}),      # a duplicate: made once
        json.dumps({"prompt": PROMPTS[1], "seed": 7, "steps": STEPS, "n_samples": 2}),   # seeds 7, 8
    ])
    events = []
    s = cpuflow.batch.run(jobs, out=tmp_path / "out", progress=events.append)
    assert (s.total, s.written, s.failed, s.duplicates) == (9, 3, 6, 1), s
    errors = dict(s.errors)
    assert "unknown field 'colour'" in errors["jobs.jsonl:2"]
    assert "steps" in errors["jobs.jsonl:3"]
    assert "no seed" in errors["jobs.jsonl:4"]
    assert "width must be a multiple of 8" in errors["jobs.jsonl:5"]
    assert "does not exist" in errors["jobs.jsonl:6"]
    assert "not valid JSON" in errors["jobs.jsonl:7"]
    seeds = sorted(read_png_metadata(p)["seed"] for p in (tmp_path / "out" / "images").glob("*.png"))
    assert seeds == [3, 7, 8]
    results = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in results) == ["done"] * 3 + ["failed"] * 6
    assert len({r["id"] for r in results}) == 9
    # a rerun does nothing and says so; --retry-failed runs the failed ones again (they fail again)
    again = cpuflow.batch.run(jobs, out=tmp_path / "out")
    assert (again.done_before, again.failed_before, again.written, again.failed) == (3, 6, 0, 0)
    retry = cpuflow.batch.run(jobs, out=tmp_path / "out", retry_failed=True)
    assert (retry.written, retry.failed) == (0, 6)
    # a different model setting is refused, not mixed into the folder
    with pytest.raises(cpuflow.errors.InvalidArgument, match="precision"):
        cpuflow.batch.run(jobs, out=tmp_path / "out", precision="bf16")


def test_prompts_times_seeds_equal_cpuflow_generate_in_two_processes(tmp_path, ref_dir):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    r = CliRunner().invoke(main, ["batch", "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "1..3",
                                  "--steps", str(STEPS), "--workers", "2", "--threads", "1", "--out",
                                  str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "6 image(s) written" in r.output and "all 6 job(s) finished" in r.output
    got = {}
    for p in (tmp_path / "out" / "images").glob("*.png"):
        meta = read_png_metadata(p)
        assert meta["batch_job"].startswith(p.stem) and meta["steps"] == STEPS
        got[(meta["prompt"], meta["seed"])] = pixels(p)
    assert len(got) == 6
    for prompt in PROMPTS[:2]:
        ref = generate_reference(ref_dir, prompt, [1, 2, 3])
        for seed, want in ref.items():
            assert (got[(prompt, seed)] == want).all(), (prompt, seed)   # bit-identical pixels


def _wait_for(out: Path, n: int, proc, timeout=120.0):
    t0 = time.time()
    while len(journal(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_ctrl_c_and_sigkill_then_rerun_give_the_uninterrupted_images(tmp_path):
    n = 16
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:2], range(n // 2), steps=10)
    whole = cpuflow.batch.run(jobs, out=tmp_path / "whole")        # one uninterrupted run
    assert whole.written == n
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cpuflow.cli", "batch", str(jobs), "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    # SIGINT at its default even when this test runs in a background job (which ignores it)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(out, 2, p)
    p.send_signal(signal.SIGINT)                                     # Ctrl-C: clean stop
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "stopped:" in err and "rerun the same command" in err and "Traceback" not in err
    after_int = len(journal(out))
    assert 2 <= after_int < n

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(out, after_int + 2, p)
    p.kill()                                                         # SIGKILL: no chance to clean up
    p.communicate(timeout=60)
    after_kill = len(journal(out))
    assert after_kill < n, "the batch finished before it was killed: the test proved nothing"

    # the worst moment of a crash, made on purpose: the last image is on disk and in
    # results.jsonl but its journal line is torn half-way
    lines = (out / "journal.jsonl").read_text().splitlines(keepends=True)
    (out / "journal.jsonl").write_text("".join(lines[:-1]) + lines[-1][:17])
    s = cpuflow.batch.run(jobs, out=out)
    assert s.adopted == 1 and s.done_before == after_kill - 1 and s.written == n - after_kill, s
    assert s.complete

    ids = [e["id"] for e in journal(out)]
    assert len(ids) == len(set(ids)) == n                            # every job once in the journal
    results = [json.loads(x)["id"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(results) == sorted(ids)                           # and once in results.jsonl
    files = sorted(x.name for x in (out / "images").iterdir())
    assert files == sorted(x.name for x in (tmp_path / "whole" / "images").iterdir())   # no temp files left
    for f in files:                                                  # byte for byte the uninterrupted run
        assert (out / "images" / f).read_bytes() == (tmp_path / "whole" / "images" / f).read_bytes(), f


def test_ray_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray -> ImportError, as without the extra
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:1], [1])
    r = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", "auto"])
    assert r.exit_code == 4
    assert r.output.strip() == "error: --ray needs Ray, which is not installed (pip install 'cpuflow[ray]')"
    assert not (tmp_path / "out").exists()


def test_journal_retry_after_failure_and_a_second_driver_is_refused(tmp_path):
    from PIL import Image

    from cpuflow.batch.jobs import BatchJob
    from cpuflow.batch.journal import OutputDir
    from cpuflow.errors import CpuflowError
    job = BatchJob(id="ab" * 32, source="jobs.jsonl:1", params={"seed": 1}, request=None)
    with OutputDir.open(tmp_path, {"model_hash": "h"}) as od:
        with pytest.raises(CpuflowError, match="another cpuflow batch is writing"):
            OutputDir.open(tmp_path, {"model_hash": "h"})
        od.write_failed(job, "worker ran out of memory")
    with OutputDir.open(tmp_path, {"model_hash": "h"}) as od:
        assert job.id in od.failed and od.is_finished(job.id) and not od.is_finished(job.id, retry_failed=True)
        od.write_done(job, Image.new("RGB", (8, 8)), {"seed": 1}, seconds=0.1, worker="w")
    with OutputDir.open(tmp_path, {"model_hash": "h"}) as od:
        assert job.id in od.done and job.id not in od.failed
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["failed", "done"]
    assert read_png_metadata(od.image_path(job.id))["batch_job"] == job.id


class _StubRay:
    """Just enough of the ray module for RayPool to start: init() installs a SIGTERM handler as
    ray.init does, and the actors cannot be made (the pool then closes itself)."""

    def __init__(self):
        self.up = False

    def is_initialized(self):
        return self.up

    def init(self, **kwargs):
        self.up = True
        signal.signal(signal.SIGTERM, lambda *a: None)

    def cluster_resources(self):
        return {"CPU": 2}

    def remote(self, **kwargs):
        class _NoActors:
            @staticmethod
            def remote():
                raise RuntimeError("no actors in this test")
        return lambda cls: _NoActors

    def kill(self, actor, no_restart=True):
        pass

    def shutdown(self):
        self.up = False


def test_ray_pool_puts_the_callers_signal_handlers_back(monkeypatch):
    """ray.init leaves its SIGTERM handler installed after ray.shutdown. A process that ran a batch
    on Ray and forked later could no longer terminate() its children (a Python handler cannot run
    while the child is blocked in C): a test session hung at exit that way. The pool that started
    Ray restores the caller's handlers when it closes."""
    from cpuflow.batch import ray_pool
    from cpuflow.pipelines.model import shipped_model_dir
    stub = _StubRay()
    monkeypatch.setattr(ray_pool, "import_ray", lambda address=None: stub)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError, match="no actors"):
        ray_pool.RayPool("auto", {}, shipped_model_dir(), workers=1, cpus_per_worker=1)
    assert not stub.up
    assert {sig: signal.getsignal(sig) for sig in before} == before
