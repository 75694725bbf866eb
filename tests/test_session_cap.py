"""Compiled sessions are capped, least recently used out first, by bytes
(issue #16 item 8): cycling through more UNet shapes than the cap holds keeps
the number of sessions, their counted bytes and the process's RSS bounded."""
from __future__ import annotations

import numpy as np
import pytest

from cpuflow.config import LoadConfig
from cpuflow.errors import InvalidArgument
from cpuflow.memory import rss_bytes
from cpuflow.pipelines.model import LoadedModel
from cpuflow.pipelines.session_cache import SessionCache

SIZES = [64 + 8 * i for i in range(12)]   # 12 shapes: 12 compiled UNets without a cap


def _unet_call(model: LoadedModel, size: int) -> None:
    ctx = model.manifest.components["unet"].input("encoder_hidden_states").shape[-1]
    z = size // 8
    model.run("unet", model.latent_dims(size, size, 2),
              {"sample": np.zeros((2, 4, z, z), np.float32), "timestep": np.full((2,), 500.0, np.float32),
               "encoder_hidden_states": np.zeros((2, 77, ctx), np.float32)})


# OpenVINO compiles each shape (about 15 s each on a busy 2-core machine): slow tier;
# the cache is the same code for both backends.
@pytest.mark.parametrize("backend", [pytest.param("openvino", marks=pytest.mark.slow), "onnxruntime"])
def test_cycling_shapes_stays_under_the_cap(tiny_export, backend):
    folder = tiny_export("sd1").model
    cfg = dict(model=folder, backend=backend, precision="f32", threads=1, use_cache=False)
    probe = LoadedModel(LoadConfig(**cfg))
    _unet_call(probe, SIZES[-1])             # the largest shape: what one session costs here
    per = probe.session_cache.total_bytes
    probe.close()
    cap = int(2.5 * per)
    model = LoadedModel(LoadConfig(**cfg, max_session_bytes=cap))
    rss = []
    for size in SIZES:
        _unet_call(model, size)
        held = list(model.loaded_sessions())
        assert model.session_cache.total_bytes <= cap or len(held) == 1
        rss.append(rss_bytes())
    held = [d["width"] for name, d, _ in model.loaded_sessions()]
    assert 1 <= len(held) <= len(SIZES) // 2 and held[-1] == SIZES[-1]   # the newest is kept, the oldest went
    assert SIZES[0] not in held and model.session_cache.evictions >= len(SIZES) - len(held)
    if rss[0] is not None:
        grown = rss[-1] - rss[2]
        # 16 MiB of allocator noise allowed: a tiny model's session is only a few MiB (a run here saw
        # 11 MiB of growth with 3.5 MiB sessions); without eviction 9 more sessions would grow by 9x
        noise = 16 * 2**20
        assert grown < 2 * per + noise, \
            f"RSS grew {grown / 2**20:.0f} MiB over 9 more shapes (one session: {per / 2**20:.0f} MiB)"
    model.close()


def test_lru_order_and_validation(tmp_path):
    closed = []

    class Sess:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    f = tmp_path / "model.onnx"
    with open(f, "wb") as fh:
        fh.truncate(1 << 20)                 # each session counts at least its file: 1 MiB
    c = SessionCache(cap_bytes=int(2.5 * (1 << 20)))
    for k in "abc":
        c.load(k, lambda k=k: Sess(k), f)
    assert closed == ["a"] and [k for k, _ in c.items()] == ["b", "c"]
    c.get("b")                               # b is now the most recently used
    c.load("d", lambda: Sess("d"), f)
    assert closed == ["a", "c"] and [k for k, _ in c.items()] == ["b", "d"]
    with pytest.raises(InvalidArgument, match="max_session_bytes"):
        LoadConfig(max_session_bytes=0)


def test_serve_option_sets_the_cap(monkeypatch):
    pytest.importorskip("uvicorn")
    import uvicorn
    from click.testing import CliRunner

    import cpuflow.server.app as app_mod
    from cpuflow.serve_cli import serve_command
    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(app_mod, "create_app", lambda models, **kw: calls.setdefault("app", kw))
    monkeypatch.delenv("CPUFLOW_TOKEN", raising=False)
    r = CliRunner().invoke(serve_command, ["--max-session-memory", "1.5"])
    assert r.exit_code == 0, r.output
    assert calls["app"]["load_options"]["max_session_bytes"] == int(1.5 * 2**30)
    LoadConfig(**calls["app"]["load_options"])   # a valid load option
