"""`cpuflow bench --throughput` on the shipped model records images/min per worker count for this
CPU and model; `cpuflow batch` (``--workers auto``) reads the record, and falls back to 1 worker
(saying why) for another model, configuration or CPU. Which count wins is never asserted: it
depends on the machine (AVX2 laptops to AMX servers) and its load."""
from __future__ import annotations

import json

from click.testing import CliRunner
from helpers_batch import PROMPTS, write_jobs

import cpuflow.batch
from cpuflow.bench import throughput
from cpuflow.cli import main
from cpuflow.cpu import default_threads
from cpuflow.manifest import load_manifest
from cpuflow.pipelines.model import shipped_model_dir


def test_worker_counts_go_up_to_the_cores():
    assert throughput.worker_counts(1) == [1]
    assert throughput.worker_counts(2) == [1, 2]
    assert throughput.worker_counts(8) == [1, 2, 4, 8]
    assert throughput.worker_counts(12) == [1, 2, 4, 8, 12]


def test_bench_throughput_record_drives_batch_workers(tmp_path, monkeypatch):
    # a cache of its own: the record must not reach the other batch tests (they expect 1 worker)
    monkeypatch.setenv("CPUFLOW_CACHE_DIR", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["bench", "--throughput", "--steps", "4", "--throughput-images", "2",
                                  "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    model_hash = load_manifest(shipped_model_dir(), verify=False).model_hash
    path = throughput.record_path(model_hash, backend="openvino", precision="auto", variant=None)
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    rec = json.loads(path.read_text())
    assert rec == json.loads((tmp_path / "t.json").read_text())["results"][0]
    counts = throughput.worker_counts(default_threads())
    rates = {int(k): v for k, v in rec["images_per_minute"].items()}
    assert sorted(rates) == counts and all(v > 0 for v in rates.values())
    assert rec["best"] == max(rates, key=rates.get)              # the fastest measured, whichever it is
    assert rec["cpu"] == throughput.machine_key() and rec["params"]["steps"] == 4
    assert rec["params"]["width"] == rec["params"]["height"] == 64  # the model's default size
    assert f"-> fastest {rec['best']}" in r.output

    # batch with no --workers runs the recorded count and says so in one line
    jobs = write_jobs(tmp_path / "jobs.jsonl", PROMPTS[:1], [1, 2])
    b = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "-q"])
    assert b.exit_code == 0, b.output
    best = rec["best"]
    line = next(x for x in b.output.splitlines() if x.startswith("workers: "))
    assert line.startswith(f"workers: {best} (bench on this machine: {rates[best]:.0f} images/min with {best}")
    assert f"/min, {best} worker(s))" in b.output and "all 2 job(s) finished" in b.output

    # another configuration or model: no record, 1 worker, and the command that makes one
    n, why = throughput.choose_workers(model_hash, backend="openvino", precision="f32", variant=None)
    assert n == 1 and why == ("workers: 1 (no throughput bench for this model on this machine yet: "
                              "run `cpuflow bench --throughput --precision f32`)")
    n, why = throughput.choose_workers("0" * 12, backend="openvino", precision="auto", variant=None,
                                       model="exported/sd15")
    assert n == 1 and "run `cpuflow bench --throughput exported/sd15`" in why
    # a record made on another CPU (a cache folder shared between machines) is not used
    path.write_text(json.dumps(dict(rec, cpu="AMD EPYC 7B13: 64 physical / 128 logical cores; avx2")))
    notes = []
    s = cpuflow.batch.run(write_jobs(tmp_path / "one.jsonl", PROMPTS[:1], [3]), out=tmp_path / "out2",
                          workers="auto", progress=lambda ev: notes.append(ev) if ev["event"] == "note" else None)
    assert s.written == 1 and s.workers == 1
    assert notes[0]["workers"] == 1 and "no throughput bench for this model on this machine" in notes[0]["message"]
