"""Shared test set-up.

Tiers: the default suite (fast, plus tiny-model export/parity tests) runs in CI;
`--runslow` adds full-size architectures and real checkpoints.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The export stage is the top-level folder export/ (installed as cpuflow_export).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Tests never touch the user's cache or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenVINO's converter and NNCF send usage telemetry unless told they run in CI (their
# `disable_in_ci`): each event forks a child process from a thread to post it, which
# has no business in a test run (no network here) and, forked from a process full of
# threads, can deadlock in the resolver.
os.environ["CI"] = "true"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run full-size (slow) tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="full-size test: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_FROZEN_FOR: list = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Keep the cyclic collector's full passes short. The export stage calls `gc.collect()` after
    each stage to return a full-size model's memory (export/build.py), and a full collection walks
    every tracked object: the imported libraries alone (torch, diffusers, transformers, OpenVINO)
    are ~0.5 M objects, and those walks took 38 s of test_export_convert.py's 85 s.

    So before each test every object then alive is moved into the collector's permanent generation
    (`gc.freeze`, what pre-forking servers do), and a collection inside the test walks only what the
    test made. Frozen objects are still freed by reference counting; cyclic garbage among them waits
    for the next module's first test, which unfreezes, collects everything once and freezes again,
    so nothing outlives its module."""
    if _FROZEN_FOR[0] is not item.module:
        _FROZEN_FOR[0] = item.module
        gc.unfreeze()
        gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPUFLOW_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cpuflow-cache"))


# Settings a caller's shell may hold that change what cpuflow does (tracebacks instead of
# one-line errors, a server token, thread counts): the suite runs the same from any shell.
CALLER_SETTINGS = ("CPUFLOW_DEBUG", "CPUFLOW_TOKEN", "CPUFLOW_THREADS", "CPUFLOW_PICKLE_TIMEOUT_S")


@pytest.fixture(autouse=True)
def _no_caller_settings(monkeypatch):
    for name in CALLER_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def _export_tiny(tmp_path_factory, name: str, save, formats=("onnx", "openvino"), events=None):
    """Save a tiny random diffusers folder with ``save(folder)`` and export it (both formats by
    default): SimpleNamespace(src, model). The session fixtures below are one call each."""
    pytest.importorskip("torch", reason="exporting a tiny model needs the export extra")
    pytest.importorskip("diffusers", reason="exporting a tiny model needs the export extra")
    from types import SimpleNamespace

    from export.build import export_model
    from export.sources import load_source

    base = tmp_path_factory.mktemp(name)
    src = save(base / "src")
    out = export_model(load_source(str(src)), base / "model", formats=formats,
                       progress=events.append if events is not None else (lambda *a, **k: None))
    return SimpleNamespace(src=Path(src), model=Path(out))


_TINY_EXPORTS: dict = {}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """tiny_export(kind) -> SimpleNamespace(src=diffusers folder, model=exported folder, events=progress events).

    One tiny random model per kind ("sd1", "sd2", "sd2-v") for the whole session,
    saved as a diffusers folder and exported to both formats. Random weights:
    these prove plumbing and parity, not image quality."""
    def make(kind: str = "sd1"):
        if kind not in _TINY_EXPORTS:
            def save(folder):
                from helpers_tiny import save_tiny_diffusers_folder
                return save_tiny_diffusers_folder(folder, kind, seed=0)

            events: list = []   # the export's progress events (tests/test_export_convert.py reads them)
            t = _export_tiny(tmp_path_factory, f"tiny-{kind}", save, events=events)
            t.events = events
            _TINY_EXPORTS[kind] = t
        return _TINY_EXPORTS[kind]

    return make


@pytest.fixture(scope="session")
def tiny_sdxl_export(tmp_path_factory):
    """SimpleNamespace(src=tiny random SDXL diffusers folder, model=its export in both formats),
    once per session (tests/test_sdxl.py and tests/test_export_direct_openvino.py share it)."""
    def save(folder):
        from helpers_sdxl import save_tiny_sdxl_folder
        return save_tiny_sdxl_folder(folder, seed=0)
    return _export_tiny(tmp_path_factory, "tiny-sdxl", save)


@pytest.fixture(scope="session")
def tiny_sdxl_taesd_ov_export(tmp_path_factory):
    """SimpleNamespace(src, model, taesd_info): the tiny random SDXL with a random tiny
    autoencoder (`--taesd random`), OpenVINO only (the direct torch -> IR path), as
    `cpuflow bench --arch sdxl` builds it; once per session (test_bench_sdxl, test_sdxl_taesd)."""
    pytest.importorskip("torch", reason="exporting a tiny model needs the export extra")
    pytest.importorskip("diffusers", reason="exporting a tiny model needs the export extra")
    from types import SimpleNamespace

    from export.build import export_model
    from export.sources import load_source
    from export.taesd import attach_taesd, load_taesd
    from helpers_sdxl import save_tiny_sdxl_folder

    base = tmp_path_factory.mktemp("tiny-sdxl-taesd-ov")
    src = save_tiny_sdxl_folder(base / "src", seed=0)
    loaded = load_source(str(src))
    tiny, info = load_taesd("random", random_weights=True, seed=0)
    attach_taesd(loaded, tiny, info)
    out = export_model(loaded, base / "model", formats=("openvino",), progress=lambda *a, **k: None)
    return SimpleNamespace(src=Path(src), model=Path(out), taesd_info=info)


_INPAINT_EXPORTS: dict = {}


@pytest.fixture(scope="session")
def tiny_inpaint_export(tmp_path_factory):
    """tiny_inpaint_export(kind) -> SimpleNamespace(src, model): a tiny random model whose UNet takes
    9 channels (inpainting), kind "sd1" or "sdxl", exported to both formats once per session."""
    def make(kind: str = "sd1"):
        if kind not in _INPAINT_EXPORTS:
            def save(folder):
                from helpers_inpaint import save_tiny_inpaint_folder, save_tiny_sdxl_inpaint_folder
                return (save_tiny_sdxl_inpaint_folder(folder) if kind == "sdxl"
                        else save_tiny_inpaint_folder(folder, kind))
            _INPAINT_EXPORTS[kind] = _export_tiny(tmp_path_factory, f"tiny-inpaint-{kind}", save)
        return _INPAINT_EXPORTS[kind]

    return make


@pytest.fixture(scope="session")
def tiny_depth_export(tmp_path_factory):
    """SimpleNamespace(src, model): a tiny random depth-to-image model (5-channel UNet + tiny DPT
    depth estimator, tests/helpers_depth.py) exported to both formats, once per session."""
    def save(folder):
        from helpers_depth import save_tiny_depth_folder
        return save_tiny_depth_folder(folder)
    return _export_tiny(tmp_path_factory, "tiny-depth", save)


@pytest.fixture(scope="session")
def tiny_upscale_export(tmp_path_factory):
    """SimpleNamespace(src=tiny random x4 upscaler diffusers folder, model=its export in both formats),
    once per session (tests/test_upscale*.py share it)."""
    def save(folder):
        from helpers_upscale import save_tiny_upscale_folder
        return save_tiny_upscale_folder(folder, seed=0)
    return _export_tiny(tmp_path_factory, "tiny-upscale", save)
