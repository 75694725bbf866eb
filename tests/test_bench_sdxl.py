"""`cpuflow bench` on a tiny SDXL folder (tests/helpers_sdxl.py, exported OpenVINO-only
with a tiny autoencoder, as `--arch sdxl` builds it): both text encoders in the text
stage, the UNet at batch 2 with guidance and batch 1 without, VAE and taesd decodes,
end to end with either decoder, load; --reference torch is skipped with a note.
One repetition, no warm-up: the module stays around a minute.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("openvino")

from click.testing import CliRunner  # noqa: E402

from cpuflow.bench import runner  # noqa: E402
from cpuflow.bench.cli import bench_command  # noqa: E402

COMMON = ["--repeat", "1", "--warmup", "0", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory, tiny_sdxl_taesd_ov_export):
    shared = tiny_sdxl_taesd_ov_export   # conftest.py: tiny SDXL + random TAESD, OpenVINO only
    return SimpleNamespace(src=shared.src, model=shared.model, base=tmp_path_factory.mktemp("bench-sdxl"))


def _bench(tiny_sdxl, name, *args):
    out = tiny_sdxl.base / f"{name}.json"
    r = CliRunner().invoke(bench_command, [str(tiny_sdxl.model), *COMMON, "--json", str(out), *args])
    assert r.exit_code == 0, r.output
    return r, json.loads(out.read_text())


def test_sdxl_bench_with_guidance_every_stage(tiny_sdxl):
    r, res = _bench(tiny_sdxl, "cfg", "--stages", "text,unet,vae,taesd,e2e,load", "--steps", "2")
    assert res["model"]["family"] == "sdxl" and res["settings"]["unet_batch"] == 2
    assert res["settings"]["width"] == 64 and res["settings"]["guidance"] == 7.5
    col = res["configs"][0]
    st = col["stages"]
    assert set(st) == {"text", "unet", "vae", "taesd", "e2e", "load_first", "load_second"}
    for key, stage in st.items():
        assert stage["error"] is None, (key, stage.get("error_log_tail"))
        assert stage["median_s"] > 0 and stage["peak_rss_gib"] > 0
    assert st["unet"]["unet_batch"] == 2
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "taesd_decoder"} <= set(col["ran"])
    assert st["e2e"]["breakdown"][0]["vae_decoder"] > 0
    assert "sdxl" not in r.output.lower() or "error" not in r.output.lower()


def test_sdxl_turbo_style_bench_without_guidance_and_taesd_decoder(tiny_sdxl):
    _, res = _bench(tiny_sdxl, "turbo", "--stages", "text,unet,e2e,load", "--steps", "1", "--guidance", "0",
                    "--decoder", "taesd", "-W", "32", "-H", "32", "--no-compile-cache")
    st = res["configs"][0]["stages"]
    # no compiled-model cache: first starts only, and nothing was found cached
    assert res["settings"]["compile_cache"] is False and "load_second" not in st
    assert all(not comp["cached"] for start in st["load_first"]["starts"] for comp in start["components"].values())
    assert res["settings"]["unet_batch"] == 1 and st["unet"]["unet_batch"] == 1
    assert res["settings"]["width"] == 32 and res["settings"]["decoder"] == "taesd"
    bd = st["e2e"]["breakdown"][0]
    assert bd["taesd_decoder"] > 0 and "vae_decoder" not in bd
    assert all(s["error"] is None for s in st.values())


def test_sdxl_reference_torch_is_skipped_with_a_note(tiny_sdxl):
    r, res = _bench(tiny_sdxl, "ref", "--stages", "text", "--reference", "torch",
                    "--reference-source", str(tiny_sdxl.src))
    assert [c["id"] for c in res["configs"]] == ["openvino/default/auto"]
    assert any("no torch reference for SDXL" in n for n in res["notes"])
    assert "no torch reference for SDXL" in r.output


def test_arch_sdxl_builds_openvino_only_with_a_random_taesd(monkeypatch, tmp_path):
    """--arch sdxl: the cached export command asks for --format openvino and --taesd random."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_popen(cmd, **kw):
        seen["cmd"] = cmd
        raise Stop

    monkeypatch.setattr(runner.subprocess, "Popen", fake_popen)
    with pytest.raises(Stop):
        runner.ensure_arch_model("sdxl", root=tmp_path, tokenizer="tok")
    cmd = seen["cmd"]
    assert cmd[cmd.index("--arch") + 1] == "sdxl" and cmd[cmd.index("--format") + 1] == "openvino"
    assert cmd[cmd.index("--taesd") + 1] == "random" and cmd[cmd.index("--tokenizer") + 1] == "tok"
    assert cmd[-1] == str(tmp_path / "sdxl-random")


def test_compile_cache_is_turned_off_when_it_would_not_fit_the_disk(tiny_sdxl):
    """A full-size SDXL cache (about its IR's size per configuration) filled the disk once:
    the bench now turns the cache off, with a note, when it would not fit."""
    from cpuflow.manifest import load_manifest
    m = load_manifest(tiny_sdxl.model)
    configs = [runner.BenchConfig("openvino", None, "auto"), runner.BenchConfig("openvino", None, "f32")]
    weights = sum(i["size"] for r, i in m.files.items() if r.endswith(".bin"))
    assert runner.cache_does_not_fit(m, configs, tiny_sdxl.base, disk_free=lambda p: 2 * runner.GIB + 2 * weights) is None
    why = runner.cache_does_not_fit(m, configs, tiny_sdxl.base, disk_free=lambda p: 2 * runner.GIB + weights)
    assert why and "no compiled-model cache" in why and "2 OpenVINO cache(s)" in why
    onnx_only = [runner.BenchConfig("onnxruntime", None, "auto")]
    assert runner.cache_does_not_fit(m, onnx_only, tiny_sdxl.base, disk_free=lambda p: 0) is None
