"""`cpuflow bench --reference genai / optimum-intel`: the peers in one table with cpuflow.

* export/optimum_layout.py writes optimum-intel's folder layout from the tiny sd1 model: its
  ports are the ones optimum-intel 2.2's exporter writes, and its models compute what the
  torch modules (and the cpuflow export of the same weights) compute;
* the CLI refuses a missing peer package (blocked in sys.modules) or a folder a peer
  cannot read with one error line, before anything is measured;
* the rounds interleave the columns (cpuflow, torch, peer, cpuflow, torch, peer ...);
* a real run of OpenVINO GenAI's Text2ImagePipeline on the tiny folder: its JSON column,
  its table rows and the comparison with cpuflow's best image.

optimum-intel itself is not installed by scripts/setup-dev.sh (its pins conflict with
this project's transformers / diffusers, bench/README.md "Peers"); its worker
(export/bench_optimum.py) is covered by the same runner paths and was run by hand.
"""
from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("openvino")

from click.testing import CliRunner  # noqa: E402

from cpuflow.bench import peers, report, runner  # noqa: E402
from cpuflow.bench.cli import bench_command  # noqa: E402
from cpuflow.errors import InvalidArgument, MissingDependency  # noqa: E402

needs_tokenizers = pytest.mark.skipif(
    not peers._has_module("openvino_tokenizers", None),
    reason="openvino-tokenizers is not installed (scripts/setup-dev.sh installs the one matching openvino)")
needs_genai = pytest.mark.skipif(
    not peers._has_module("openvino_genai", None),
    reason="openvino-genai is not installed (scripts/setup-dev.sh installs the one matching openvino)")


@pytest.fixture(scope="module")
def tiny(tiny_export):
    return tiny_export("sd1")


@pytest.fixture(scope="module")
def optimum_folder(tiny, tmp_path_factory):
    """The tiny sd1 model (same weights as tiny.model) in optimum-intel's layout."""
    pytest.importorskip("openvino_tokenizers", reason="the layout's OpenVINO tokenizer needs openvino-tokenizers")
    from export.optimum_layout import write_optimum_folder
    from export.sources import load_source

    return write_optimum_folder(load_source(str(tiny.src)), tmp_path_factory.mktemp("optimum") / "sd1-optimum")


def _fake_folder(root, *, tokenizer=True, scheduler=None):
    """A folder with the files check_folder looks for (empty models: nothing is loaded)."""
    for rel in ("text_encoder/openvino_model.xml", "unet/openvino_model.xml", "vae_decoder/openvino_model.xml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler or {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000}))
    if tokenizer:
        (root / "tokenizer").mkdir(exist_ok=True)
        (root / "tokenizer" / "openvino_tokenizer.xml").write_text("")
    return root


# ---------------------------------------------------------------- the folder layout
# what optimum-intel 2.2 (`optimum-cli export openvino --task text-to-image`) wrote for this tiny model:
# name, element type, rank, static dims (index -> size)
OPTIMUM_PORTS = {
    "text_encoder": ([("input_ids", "i64", 2, {})],
                     [("last_hidden_state", "f32", 3, {2: 128}), ("pooler_output", "f32", 2, {1: 128})]),
    "unet": ([("sample", "f32", 4, {1: 4}), ("timestep", "i64", 1, {}), ("encoder_hidden_states", "f32", 3,
                                                                          {1: 77, 2: 128})],
             [("out_sample", "f32", 4, {1: 4})]),
    "vae_decoder": ([("latent_sample", "f32", 4, {1: 4})], [("sample", "f32", 4, {1: 3})]),
    "vae_encoder": ([("sample", "f32", 4, {1: 3})], [("latent_parameters", "f32", 4, {1: 8})]),
}


@needs_tokenizers
def test_layout_has_optimum_intels_ports(optimum_folder):
    import openvino as ov

    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/openvino_tokenizer.xml",
                "tokenizer/openvino_detokenizer.xml", "tokenizer/vocab.json"):
        assert (optimum_folder / rel).is_file(), rel
    core = ov.Core()
    for comp, (ins, outs) in OPTIMUM_PORTS.items():
        assert (optimum_folder / comp / "config.json").is_file()
        m = core.read_model(str(optimum_folder / comp / "openvino_model.xml"))
        for ports, want in ((m.inputs, ins), (m.outputs, outs)):
            assert len(ports) == len(want), comp
            for port, (name, et, rank, static) in zip(ports, want):
                ps = port.get_partial_shape()
                assert name in port.get_names() and port.get_element_type().get_type_name() == et, (comp, name)
                assert ps.rank.get_length() == rank, (comp, name)
                for i in range(rank):
                    assert (ps[i].is_static and ps[i].get_length() == static[i]) if i in static else ps[i].is_dynamic
    assert peers.check_folder("genai", optimum_folder) == optimum_folder.resolve()


@needs_tokenizers
def test_layout_computes_what_torch_and_the_cpuflow_export_compute(tiny, optimum_folder):
    """Same weights: the text encoder against transformers (a reload that silently starts from
    random weights would show here), the UNet against the cpuflow export of the same model."""
    import openvino as ov
    import torch
    from transformers import CLIPTextModel

    from cpuflow.manifest import load_manifest

    core = ov.Core()
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (1, 77)).astype(np.int64)
    with torch.no_grad():
        ref = CLIPTextModel.from_pretrained(str(tiny.src / "text_encoder")).eval()(torch.from_numpy(ids))
    te = core.compile_model(str(optimum_folder / "text_encoder" / "openvino_model.xml"), "CPU", f32)({"input_ids": ids})
    assert np.abs(te["last_hidden_state"] - ref.last_hidden_state.numpy()).max() < 1e-4
    assert np.abs(te["pooler_output"] - ref.pooler_output.numpy()).max() < 1e-4

    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ehs = rng.standard_normal((2, 77, 128)).astype(np.float32)
    ours = core.compile_model(str(optimum_folder / "unet" / "openvino_model.xml"), "CPU", f32)(
        {"sample": x, "timestep": np.array([500, 500], np.int64), "encoder_hidden_states": ehs})["out_sample"]
    m = load_manifest(tiny.model)
    cf = core.compile_model(str(m.path(m.components["unet"].variants["fp32"].model_file("openvino"))), "CPU", f32)
    theirs = cf({"sample": x, "timestep": np.array([500.0, 500.0], np.float32), "encoder_hidden_states": ehs})
    theirs = theirs[cf.outputs[0]]
    assert np.abs(ours - theirs).max() < 1e-4


def test_a_peer_folder_with_other_weights_is_refused(tiny, optimum_folder, tmp_path):
    """The peer workers compare the UNet's first convolution with the cpuflow model's: equal for
    the folder written from the same source, refused for one whose conv_in differs."""
    import torch

    from cpuflow.errors import ModelError
    from export.optimum_layout import write_optimum_folder
    from export.sources import load_source

    assert peers.check_same_unet(tiny.model, optimum_folder) == {"unet.conv_in": True}
    other = load_source(str(tiny.src))
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1e-3)
    f = write_optimum_folder(other, tmp_path / "other", tokenizer=False)
    with pytest.raises(ModelError, match="another UNet"):
        peers.check_same_unet(tiny.model, f)


@needs_tokenizers
@needs_genai
def test_fix_for_genai_repairs_what_genai_cannot_read(optimum_folder, tmp_path):
    """No openvino_tokenizer.xml and DPM-Solver's -Infinity: refused with the command that fixes
    it; after that command GenAI builds the pipeline and makes an image with that scheduler."""
    import openvino_genai

    from export.optimum_layout import fix_for_genai

    f = shutil.copytree(optimum_folder, tmp_path / "broken")
    for p in (f / "tokenizer").glob("openvino_*tokenizer.*"):
        p.unlink()
    sched = json.loads((f / "scheduler" / "scheduler_config.json").read_text())
    sched.update(_class_name="DPMSolverMultistepScheduler", lambda_min_clipped=float("-inf"))
    (f / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))   # writes -Infinity
    with pytest.raises(InvalidArgument, match="openvino_tokenizer.xml.*-Infinity.*no DPMSolverMultistep") as e:
        peers.check_folder("genai", f)
    assert "--fix-genai" in e.value.hint and "--scheduler EulerDiscreteScheduler" in e.value.hint
    peers.check_folder("optimum-intel", f)     # optimum-intel reads it as it is
    with pytest.raises(InvalidArgument, match="pass --scheduler"):
        fix_for_genai(f)
    changed = fix_for_genai(f, "EulerDiscreteScheduler")
    assert any("tokenizer" in c for c in changed) and any("lambda_min_clipped" in c for c in changed)
    assert json.loads((f / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    peers.check_folder("genai", f)
    pipe = openvino_genai.Text2ImagePipeline(str(f), "CPU")
    img = pipe.generate("a cat", width=64, height=64, num_inference_steps=2, guidance_scale=7.5, rng_seed=0)
    assert tuple(img.shape) == (1, 64, 64, 3)


# ---------------------------------------------------------------- errors before anything runs
def _cli(args):
    return CliRunner().invoke(bench_command, [str(a) for a in args])


def _one_error_line(r, code, *needles):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errs = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def test_cli_refuses_a_missing_peer_package(tmp_path, monkeypatch):
    folder = _fake_folder(tmp_path / "opt")
    monkeypatch.setitem(sys.modules, "openvino_genai", None)   # import openvino_genai now fails
    monkeypatch.setattr(peers, "_IMPORTABLE", {})
    # MODEL_DIR need not exist: the check comes before anything is read, built or measured
    r = _cli([tmp_path / "nothing", "--reference", "genai", "--reference-source", folder])
    _one_error_line(r, MissingDependency.exit_code, "openvino_genai", "cpuflow[peers]")
    monkeypatch.setitem(sys.modules, "optimum", None)
    r = _cli([tmp_path / "nothing", "--reference", "optimum-intel", "--reference-source", folder])
    _one_error_line(r, MissingDependency.exit_code, "optimum", "--peer-python")
    with pytest.raises(MissingDependency):
        runner.run_bench(tmp_path / "nothing", [], runner.BenchSettings(stages="e2e"),
                         peers=[peers.PeerRef("genai", str(folder))])


def test_cli_refuses_a_folder_a_peer_cannot_read(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "_IMPORTABLE", {("openvino_genai", None): True, ("optimum.intel.openvino", None): True})
    model = tmp_path / "nothing"
    r = _cli([model, "--reference", "genai"])
    _one_error_line(r, InvalidArgument.exit_code, "needs an optimum-intel OpenVINO folder", "optimum_layout")
    r = _cli([model, "--reference", "genai", "--reference-source", tmp_path / "missing"])
    _one_error_line(r, InvalidArgument.exit_code, "no such folder")
    half = _fake_folder(tmp_path / "half")
    (half / "unet" / "openvino_model.xml").unlink()
    r = _cli([model, "--reference", "optimum-intel", "--reference-source", half])
    _one_error_line(r, InvalidArgument.exit_code, "not an optimum-intel OpenVINO folder", "unet/openvino_model.xml")
    no_tok = _fake_folder(tmp_path / "notok", tokenizer=False,
                          scheduler={"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": float("-inf")})
    r = _cli([model, "--reference", "genai", "--reference-source", f"genai={no_tok}"])
    _one_error_line(r, InvalidArgument.exit_code, "openvino_tokenizer.xml", "-Infinity", "--fix-genai")
    r = _cli([model, "--reference-source", no_tok])
    _one_error_line(r, InvalidArgument.exit_code, "--reference-source goes with --reference")
    r = _cli([model, "--reference", "genai", "--peer-python", sys.executable, "--reference-source", no_tok])
    _one_error_line(r, InvalidArgument.exit_code, "--peer-python goes with --reference optimum-intel")


def test_reference_sources_are_split_by_name():
    assert peers.parse_sources(("torch", "genai"), ("torch=a", "b", "genai=c")) == {"torch": ["a"],
                                                                                  "genai": ["b", "c"]}
    assert peers.parse_sources(("genai", "optimum-intel"), ("f",)) == {"genai": ["f"], "optimum-intel": ["f"]}
    assert peers.parse_sources(("torch",), ("x=y",)) == {"torch": ["x=y"]}   # not a reference name: a path
    with pytest.raises(InvalidArgument, match="not among"):
        peers.parse_sources(("torch",), ("genai=f",))


# ---------------------------------------------------------------- interleaving and the report
def test_rounds_interleave_the_columns(tmp_path):
    configs = [runner.BenchConfig("openvino", None, "auto"), runner.BenchConfig("openvino", "fp32", "f32")]
    settings = runner.BenchSettings(stages="e2e,load,unet", rounds=3, repeat=1, warmup=1)
    base = {"model": "m", "width": 64, "height": 64}
    ref = {"source": None, "arch": "sd15", "seed": 0, "tokenizer": None}
    p = [peers.PeerRef("genai", str(tmp_path / "opt")), peers.PeerRef("optimum-intel", str(tmp_path / "opt"),
                                                                         python="/venv/bin/python")]
    jobs = runner._plan(configs, settings, base, tmp_path, ref, p)
    cols = ["openvino/default/auto", "openvino/fp32/f32", "torch", "genai:opt/auto", "optimum-intel:opt/auto"]
    load = [j for j in jobs if j.stage_key.startswith("load")]
    assert {j.column for j in load} == set(cols)     # load: once per column, peers get fresh-process starts
    assert sum(1 for j in load if j.column == "genai:opt/auto") == 2
    e2e = [j.column for j in jobs if j.stage_key == "e2e"]
    assert e2e == cols * 3                           # cpuflow, torch, peers, then again: round by round
    unet = [j.column for j in jobs if j.stage_key == "unet"]
    assert unet == cols[:3] * 3                      # no unet stage for a peer
    assert all(j.python == "/venv/bin/python" for j in jobs if j.column.startswith("optimum-intel"))
    assert all(j.spec["kind"] == "genai" and j.spec["source"].endswith("opt") for j in jobs
               if j.column.startswith("genai"))
    assert [j.stage_key for j in jobs][0].startswith("load")   # load first: it fills the compiled cache
    with pytest.raises(InvalidArgument, match="rounds"):
        runner.BenchSettings(rounds=0)


def _col(cid, kind, best, rss):
    return {"id": cid, "kind": kind, "stages": {"e2e": {"min_s": best, "median_s": best, "peak_rss_gib": rss}}}


def test_peer_comparison_uses_the_fastest_peer_best():
    cols = [_col("openvino/default/auto", "cpuflow", 7.0, 3.0), _col("openvino/fp32/f32", "cpuflow", 30.0, 9.0),
            _col("torch", "reference", 50.0, 5.0), _col("genai:a/auto", "peer", 10.0, 4.0),
            _col("optimum-intel:a/auto", "peer", 12.0, 6.0)]
    c = runner.peer_comparison(cols)
    assert c["fastest_peer"] == "genai:a/auto" and c["fastest_peer_best_s"] == 10.0
    assert c["cpuflow"]["openvino/default/auto"] == {"best_s": 7.0, "ratio": 0.7, "met": True, "peak_rss_gib": 3.0,
                                                     "rss_not_higher": True}
    assert c["cpuflow"]["openvino/fp32/f32"]["met"] is False and c["cpuflow"]["openvino/fp32/f32"]["ratio"] == 3.0
    assert "torch" not in c["cpuflow"]
    assert runner.peer_comparison(cols[:3]) is None


@needs_tokenizers
@needs_genai
def test_genai_in_one_interleaved_run_with_cpuflow(tiny, optimum_folder, tmp_path):
    """A real run: cpuflow and GenAI on the same tiny weights, two rounds, e2e only; the JSON
    column, the table's rows and the comparison block."""
    out = tmp_path / "r.json"
    r = _cli([tiny.model, "--reference", "genai", "--reference-source", optimum_folder, "--precision", "f32",
              "--stages", "e2e", "--rounds", "2", "--repeat", "1", "--warmup", "1", "--steps", "2",
              "-W", "64", "-H", "64", "--threads", "1", "-q", "--json", out])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["settings"]["rounds"] == 2 and res["settings"]["peers"] == ["genai:sd1-optimum/f32"]
    cf, peer = res["configs"]
    assert cf["kind"] == "cpuflow" and peer["kind"] == "peer" and peer["backend"] == "genai"
    st = peer["stages"]["e2e"]
    assert st["error"] is None and len(st["times_s"]) == 2 and len(st["warmup_times_s"]) == 2   # one per round
    assert st["min_s"] == min(st["times_s"]) > 0 and st["peak_rss_gib"] > 0
    assert peer["ran"]["pipeline"]["precision"] == "f32" and peer["ran"]["pipeline"]["backend"].startswith(
        "openvino-genai")
    assert len(st["breakdown"]) == 2 and all(b["unet_per_call"] > 0 for b in st["breakdown"])
    assert len(cf["stages"]["e2e"]["times_s"]) == 2
    assert st["weights_check"] == {"unet.conv_in": True}
    cmp_ = res["peer_comparison"]
    assert cmp_["fastest_peer"] == peer["id"]
    assert cmp_["cpuflow"][cf["id"]]["ratio"] == pytest.approx(cf["stages"]["e2e"]["min_s"] / st["min_s"], rel=1e-3)
    assert "ratios" in res and peer["id"] not in res["ratios"]
    text = report.format_table(res)
    assert "genai:sd1-optimum/f32" in text and "OpenVINO GenAI Text2ImagePipeline" in text
    assert "/ fastest peer (genai:sd1-optimum/f32)" in text and "target <= x0.7" in text
    assert "AVX512-BF16" in text and "2 interleaved rounds" in text
    assert text in r.output
