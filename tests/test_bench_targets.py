"""Issue 17 item 6: `cpuflow bench --json/--chart` into a place it cannot write is
refused before anything is measured (not with a PermissionError after the run)."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from cpuflow.bench import runner
from cpuflow.bench.cli import bench_command
from cpuflow.pipelines.model import shipped_model_dir


@pytest.fixture
def measured(monkeypatch):
    calls = []

    def run_bench(*a, **k):   # the measurement itself: must never start
        calls.append(a)
        raise AssertionError("measured before the output targets were checked")

    monkeypatch.setattr(runner, "run_bench", run_bench)
    return calls


def bench(*args):
    return CliRunner().invoke(bench_command, [str(shipped_model_dir()), "--stages", "unet", "-q", *map(str, args)])


def bad_targets(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_folder = tmp_path / "folder.json"
    a_folder.mkdir()
    out = [("inside a file", a_file / "r.json"), ("a folder", a_folder)]
    if os.geteuid() != 0:   # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out.append(("read-only folder", ro / "r.json"))
    return out


@pytest.mark.parametrize("flag", ["--json", "--chart"])
def test_unwritable_targets_are_refused_before_measuring(tmp_path, measured, flag):
    for what, target in bad_targets(tmp_path):
        r = bench(flag, target)
        assert r.exit_code == 2, (what, r.output)
        assert "rror: " in r.output and str(target.name) in r.output, (what, r.output)   # ours or click's
        assert measured == [], what


def test_a_writable_target_is_left_untouched_by_the_check(tmp_path, measured):
    target = tmp_path / "r.json"
    r = bench("--json", target)
    assert len(measured) == 1 and "measured before" in repr(r.exception)   # the check passed, measuring began
    assert list(tmp_path.iterdir()) == []                                  # and left no file behind
