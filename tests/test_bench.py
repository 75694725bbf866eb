"""`cpuflow bench` on a tiny exported model: worker processes, the JSON layout,
the table, the chart, two configurations in one run, and the torch reference on
the same weights (with the check that they are the same weights).

One tiny sd1 model is exported per module; every bench run is cut to one
repetition and no warm-up so the module stays well under a minute.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnx")
pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from conftest import ROOT  # noqa: E402
from helpers_tiny import save_tiny_diffusers_folder, tiny_sd_components  # noqa: E402
from PIL import Image  # noqa: E402

from cpuflow.bench import report, runner, worker  # noqa: E402
from cpuflow.bench.cli import bench_command  # noqa: E402
from cpuflow.errors import InvalidArgument  # noqa: E402
from cpuflow.manifest import load_manifest  # noqa: E402

STAGE_KEYS = {"text", "unet", "vae", "e2e", "load_first", "load_second"}


@pytest.fixture(scope="module")
def tiny(tiny_export):
    t = tiny_export("sd1")
    return SimpleNamespace(src=t.src, model=t.model, manifest=load_manifest(t.model))


@pytest.fixture(scope="module")
def two_configs(tiny, tmp_path_factory):
    """One CLI run: openvino and onnxruntime, every stage, JSON and chart."""
    out = tmp_path_factory.mktemp("bench-run")
    args = [str(tiny.model), "--backend", "openvino", "--backend", "onnxruntime", "--repeat", "1", "--warmup", "0",
            "--steps", "2", "--threads", "1", "-q", "--json", str(out / "r.json"), "--chart", str(out / "r.png")]
    r = CliRunner().invoke(bench_command, args)
    return SimpleNamespace(result=r, json=out / "r.json", chart=out / "r.png")


def test_bench_modules_import_no_torch():
    code = textwrap.dedent("""
        import sys
        import cpuflow.bench, cpuflow.bench.cli, cpuflow.bench.runner, cpuflow.bench.report, cpuflow.bench.worker
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx"))
        assert not bad, bad
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stages_and_configs(tiny):
    assert runner.parse_stages("e2e,text,load") == ("load", "text", "e2e")  # load first: it fills the cache
    with pytest.raises(InvalidArgument, match="stages must be"):
        runner.parse_stages("unet,decode")
    configs, notes = runner.make_configs(tiny.manifest, ["openvino", "onnxruntime"], [None, "int8"],
                                         ["auto", "f32", "bf16"])
    assert [c.id for c in configs] == ["openvino/default/auto", "openvino/default/f32", "openvino/default/bf16",
                                       "onnxruntime/default/auto"]
    text = " | ".join(notes)
    assert "no variant int8" in text
    assert "onnxruntime/default/f32" in text and "measured once" in text
    assert "onnxruntime/default/bf16" in text
    with pytest.raises(InvalidArgument, match="no configuration"):
        runner.make_configs(tiny.manifest, ["onnxruntime"], ["int8"], ["auto"])


def test_two_configurations_json_table_chart(two_configs, tiny):
    r = two_configs.result
    assert r.exit_code == 0, r.output + repr(r.exception)
    data = json.loads(two_configs.json.read_text())
    assert data["schema"] == "cpuflow-bench/1"
    mach = data["machine"]
    for k in ("amx", "avx512f", "vnni", "bf16", "model_name"):
        assert k in mach["cpu"]
    for k in ("cpuflow", "openvino", "onnxruntime", "torch", "diffusers", "python"):
        assert k in mach["versions"]
    assert mach["threads"]["requested"] == 1 and mach["date"]
    s = data["settings"]
    assert (s["width"], s["height"], s["steps"], s["guidance"], s["repeat"], s["warmup"]) == (64, 64, 2, 7.5, 1, 0)
    assert s["unet_batch"] == 2
    assert data["model"]["model_hash"] == tiny.manifest.model_hash
    assert [c["id"] for c in data["configs"]] == ["openvino/default/auto", "onnxruntime/default/auto"]
    for col in data["configs"]:
        assert set(col["stages"]) == STAGE_KEYS, col["id"]
        for key, st in col["stages"].items():
            assert st["error"] is None, (col["id"], key, st.get("error_log_tail"))
            assert len(st["times_s"]) == 1 and st["median_s"] == st["min_s"] == st["max_s"] > 0
            assert st["peak_rss_bytes"] > 20 * 2**20  # a real process's high-water mark
        first, second = col["stages"]["load_first"], col["stages"]["load_second"]
        assert first["starts"][0]["components"].keys() == {"text_encoder", "unet", "vae_decoder"}
        # an empty cache, then the cache the first start wrote (OpenVINO's compiled
        # blobs; onnxruntime's saved optimised graphs)
        assert not any(c["cached"] for c in first["starts"][0]["components"].values())
        assert all(c["cached"] for c in second["starts"][0]["components"].values())
        assert col["stages"]["e2e"]["breakdown"][0]["unet_per_call"] > 0
        ran = col["ran"]["unet"]
        assert ran["backend"] == col["backend"] and ran["variant"] == "fp32"
        if col["backend"] == "openvino":
            assert ran["threads"] == 1
    precisions = {c["id"]: c["ran"]["unet"]["precision"] for c in data["configs"]}
    # what the session really computed in (OpenVINO's auto picks bf16 on CPUs with native bf16)
    assert precisions["openvino/default/auto"] in ("bf16", "f32")
    assert precisions["onnxruntime/default/auto"] == "f32"
    # the table: stage rows x configuration columns, printed to stdout
    out = r.output
    for needle in ("UNet, 1 call (batch 2)", "load+compile, 1st start", "openvino/default/auto",
                   "onnxruntime/default/auto", "RSS GiB", "threads 1"):
        assert needle in out, needle
    assert r.stdout == report.format_table(data) + "\n"
    img = Image.open(two_configs.chart)
    assert img.format == "PNG" and img.size[0] == 1000 and img.size[1] > 400


def test_reference_torch_on_the_same_weights(tiny):
    settings = runner.BenchSettings(stages="unet", repeat=1, warmup=0, steps=2)
    configs, _ = runner.make_configs(tiny.manifest, ["openvino"], [None], ["f32"])
    res = runner.run_bench(tiny.model, configs, settings, reference="torch", reference_source=str(tiny.src),
                           show_progress=False)
    ref = res["configs"][-1]
    assert ref["kind"] == "reference" and ref["id"] == "torch"
    unet = ref["stages"]["unet"]
    assert unet["error"] is None, unet.get("error_log_tail")
    assert unet["weights_check"]["unet"] == {"conv_in.weight": True, "conv_out.weight": True}
    assert ref["ran"]["pipeline"]["backend"] == "torch"
    ratio = res["ratios"]["openvino/default/f32"]["unet"]
    assert ratio == pytest.approx(unet["median_s"] / res["configs"][0]["stages"]["unet"]["median_s"], rel=1e-2)
    assert "vs torch" in report.format_table(res)


def test_weights_check_catches_other_weights(tiny):
    from export.bench_reference import WeightsMismatch, check_same_weights

    same = tiny_sd_components("sd1", seed=0)
    report_ = check_same_weights(same, tiny.model)
    assert all(all(v.values()) for v in report_.values())
    other = tiny_sd_components("sd1", seed=1)
    with pytest.raises(WeightsMismatch, match="not the exported model's"):
        check_same_weights(other, tiny.model)


def test_reference_needs_torch_weights(tiny):
    with pytest.raises(InvalidArgument, match="--reference-source"):
        runner.reference_source_for(tiny.manifest, None, None)
    ref = runner.reference_source_for(tiny.manifest, None, "sd15")
    assert (ref["source"], ref["arch"], ref["seed"]) == (None, "sd15", runner.ARCH_SEED)
    assert ref["tokenizer"] == str(tiny.model / "tokenizer")   # random weights carry no tokenizer
    assert runner.reference_source_for(tiny.manifest, str(tiny.src), None)["tokenizer"] is None


def test_arch_model_is_built_once(tiny, tmp_path):
    """A cached --arch model (folder + record with its hash) is reused, not rebuilt."""
    import shutil

    shutil.copytree(tiny.model, tmp_path / "sd15-random")
    (tmp_path / "sd15-random.bench.json").write_text(json.dumps(
        {"arch": "sd15", "seed": runner.ARCH_SEED, "model_hash": tiny.manifest.model_hash}))
    path, rec = runner.ensure_arch_model("sd15", root=tmp_path)
    assert path == tmp_path / "sd15-random" and rec["built_now"] is False


def test_memory_figures_of_this_process():
    m = worker.memory_status()
    assert m["hwm"] >= m["rss"] > 0
    if worker.reset_peak_rss():
        assert worker.memory_status()["hwm"] <= m["hwm"]


def test_cli_refuses_bad_arguments(tiny):
    r = CliRunner().invoke(bench_command, [])
    assert r.exit_code == 2 and "either MODEL_DIR" in r.output
    r = CliRunner().invoke(bench_command, [str(tiny.model), "--stages", "unet,nope"])
    assert r.exit_code == 2 and "stages must be" in r.output
    r = CliRunner().invoke(bench_command, [str(tiny.model), "--reference", "torch"])
    assert r.exit_code == 2 and "--reference-source" in r.output
