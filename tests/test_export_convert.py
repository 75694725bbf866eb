"""Export stage: tiny random SD models -> ONNX / OpenVINO folders, the parity
gate, and the crash / disk / folder safety of the export (reliability.md 3-8).

Exports are shared across tests (module-scoped fixtures); the failure-path
tests export ONNX only, where the behaviour under test does not depend on the
format.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

from click.testing import CliRunner  # noqa: E402
from helpers_tiny import save_tiny_diffusers_folder  # noqa: E402

from cpuflow.errors import DiskSpaceError, InvalidArgument, ValidationFailed  # noqa: E402
from cpuflow.manifest import MANIFEST_NAME, load_manifest  # noqa: E402
from export import build, to_onnx, validate  # noqa: E402
from export.build import export_model  # noqa: E402
from export.cli import export_command  # noqa: E402
from export.components import component_specs, run_torch  # noqa: E402
from export.sources import load_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("sd1", "sd2", "sd2-v")


def quiet(ev) -> None:
    pass


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, ev):
        self.events.append(ev)


@pytest.fixture(scope="module")
def sources(tiny_export):
    """kind -> the tiny diffusers folder of the session's shared export (read only)."""
    return {kind: tiny_export(kind).src for kind in KINDS}


@pytest.fixture(scope="module")
def exported(tiny_export):
    """kind -> (model folder, progress events) for all three tiny kinds, both formats: the
    session's shared exports (conftest.tiny_export), so they are made once for the whole suite.
    Tests that change a folder copy it first."""
    return {kind: (tiny_export(kind).model, tiny_export(kind).events) for kind in KINDS}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


class AddOffset(torch.nn.Module):
    """Wraps a component so the EXPORTED graph is off by +0.1 (torch reference is not)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*args)   # a text encoder gives several outputs (schema 2): offset each
        return tuple(o + 0.1 for o in out) if isinstance(out, tuple) else out + 0.1


def break_export(monkeypatch, component: str) -> None:
    real = build.export_onnx

    def export_onnx(module, spec, *args, **kwargs):
        if spec.name == component:
            module = AddOffset(module).eval()
        return real(module, spec, *args, **kwargs)

    monkeypatch.setattr(build, "export_onnx", export_onnx)


# --- the exported folders ---------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_manifest_loads_and_describes_the_model(exported, sources, kind):
    path, _ = exported[kind]
    m = load_manifest(path, verify="sha256")
    assert m.family == ("sd1" if kind == "sd1" else "sd2")
    assert m.prediction_type == ("v_prediction" if kind == "sd2-v" else "epsilon")
    assert m.validated is True and m.raw["export"]["forced"] is False
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert m.formats() == {"onnx", "openvino"}
    tok = m.tokenizer
    assert tok["path"] == "tokenizer" and "vocab.json" in tok["files"] and tok["max_length"] == 77
    vocab = json.loads((path / "tokenizer" / "vocab.json").read_text())
    assert tok["bos_token_id"] == vocab["<|startoftext|>"] and tok["eos_token_id"] == vocab["<|endoftext|>"]
    # the export writes tokenizer.json (the sources have none); the runtime loads it, not vocab/merges
    assert "tokenizer.json" in tok["files"] and not (sources[kind] / "tokenizer" / "tokenizer.json").exists()
    from cpuflow.tokenizer import ClipTokenizer
    ours = ClipTokenizer.from_dir(path / "tokenizer")
    assert ours._tok.get_vocab_size() == len(vocab)
    assert ours.encode("a photo of an astronaut") == ClipTokenizer.from_dir(sources[kind] / "tokenizer").encode(
        "a photo of an astronaut")
    assert m.scheduler and m.scaling_factor > 0 and m.downscale >= 2
    for name, comp in m.components.items():
        var = comp.variants["fp32"]
        assert var.precision == "fp32" and var.quantization is None
        onnx_files = var.files["onnx"]
        assert onnx_files == (f"{name}/model.onnx", f"{name}/model.onnx_data")
        assert var.files["openvino"] == (f"{name}/openvino_model.xml", f"{name}/openvino_model.bin")
    tools = m.raw["export"]["tools"]
    assert {"cpuflow", "torch", "onnx", "onnxruntime", "openvino", "python"} <= set(tools)
    # nothing but the export itself beside it
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("kind", KINDS)
def test_gate_figures_recorded_and_passing(exported, kind):
    path, events = exported[kind]
    m = load_manifest(path, verify=False)
    for comp in m.components.values():
        for fmt in ("onnx", "openvino"):
            p = comp.variants["fp32"].parity[fmt]
            assert p["passed"] is True, (comp.name, fmt, p)
            assert p["rel_max"] <= 1e-3 and p["psnr_db"] >= 60, (comp.name, fmt, p)
            assert p["tolerance"] == {"rel_max": 1e-3, "psnr_db": 60.0}
    lines = [e.message for e in events if e.message]
    assert any(line.startswith("[unet] onnx export ... ") and line.endswith(" s") for line in lines)
    assert any("[vae_encoder] openvino parity vs torch" in line for line in lines)
    ends = [e for e in events if e.kind == "end"]
    assert ends[-1].step == ends[-1].total  # the bar ends full


@pytest.mark.parametrize("kind", KINDS)
def test_io_contract_and_dynamic_dims(exported, kind):
    path, _ = exported[kind]
    m = load_manifest(path, verify=False)
    expect = {
        "text_encoder": (["inputs_embeds"], ["last_hidden_state", "hidden_states"]),
        "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
    }
    for name, (ins, outs) in expect.items():
        comp = m.components[name]
        assert [s.name for s in comp.inputs] == ins and [s.name for s in comp.outputs] == outs
        sess = ort.InferenceSession(str(m.path(comp.variants["fp32"].files["onnx"][0])),
                                    providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ins
        assert [o.name for o in sess.get_outputs()] == outs
        for spec, i in zip(comp.inputs, sess.get_inputs()):
            assert list(i.shape) == list(spec.shape), (name, spec, i.shape)
        ovm = ov.Core().read_model(str(m.path(comp.variants["fp32"].files["openvino"][0])))
        assert [p.get_any_name() for p in ovm.inputs] == ins
        assert [p.get_any_name() for p in ovm.outputs] == outs
        for spec, p in zip(comp.inputs, ovm.inputs):
            dims = list(p.get_partial_shape())
            for d, want in zip(dims, spec.shape):
                assert d.is_dynamic if isinstance(want, str) else d.get_length() == want
    te = m.components["text_encoder"]
    # schema 2: token embeddings in (the table beside the encoder), every layer's states out
    hidden = te.config["hidden_size"]
    assert te.input("inputs_embeds").shape == ("batch", 77, hidden) and te.input("inputs_embeds").dtype == "float32"
    assert te.output("hidden_states").shape == ("batch", te.config["num_hidden_layers"] + 1, 77, hidden)
    table = np.load(m.path(te.config["token_embeddings"]["path"]))
    assert table.shape == (te.config["vocab_size"], hidden)
    assert m.components["unet"].input("encoder_hidden_states").shape[1] == "text_length"   # 77 x chunks
    assert m.components["vae_encoder"].output("latent_parameters").shape[1] == 2 * m.latent_channels


def test_exported_files_match_torch_at_other_shapes(exported, sources):
    """Independent of the gate: other batch sizes and latent sizes (incl. one that is
    not a multiple of the UNet's upsampling factor) on both backends."""
    path, _ = exported["sd1"]
    m = load_manifest(path, verify=False)
    loaded = load_source(str(sources["sd1"]))
    specs = component_specs(loaded, 77)
    dims = {"batch": 3, "latent_height": 5, "latent_width": 4, "height": 40, "width": 24}
    for name, spec in specs.items():
        module = spec.wrap(getattr(loaded, spec.source_attr)).eval()
        feeds = spec.sample_inputs(dims, seed=11)
        ref = run_torch(module, spec, feeds)
        files = m.components[name].variants["fp32"].files
        for fmt in ("onnx", "openvino"):
            out = validate.RUNNERS[fmt](m.path(files[fmt][0]), feeds)
            entry = validate.parity(ref, out, "fp32")
            assert entry["passed"], (name, fmt, entry)


# --- weights fp16 / consolidation --------------------------------------------------------
def test_fp16_weights_keep_float32_interface(sources, exported, tmp_path):
    """--weights fp16 on the UNet (component level, to keep the suite fast): fp16
    initializers behind Casts in ONNX, compressed IR, float32 interface, and
    both within the fp16 tolerance of torch."""
    from export.components import torch_inputs, wrap_for_export
    from export.to_openvino import convert_onnx_to_openvino

    loaded = load_source(str(sources["sd2"]))
    spec = component_specs(loaded, 77)["unet"]
    module = wrap_for_export(loaded, spec)
    feeds = spec.sample_inputs(spec.check_dims, seed=1)
    ref = run_torch(module, spec, feeds)
    example = torch_inputs(spec.sample_inputs(spec.trace_dims), spec)
    fp32_dir = exported["sd2"][0] / "unet"
    files16, _ = to_onnx.export_onnx(module, spec, example, tmp_path / "u16", weights="fp16")
    assert files16[1].stat().st_size < 0.6 * (fp32_dir / "model.onnx_data").stat().st_size
    model = onnx.load(str(files16[0]), load_external_data=False)
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    xml16 = convert_onnx_to_openvino(files16[0], tmp_path / "u16", weights="fp16")[0]
    assert xml16.with_suffix(".bin").stat().st_size < 0.6 * (fp32_dir / "openvino_model.bin").stat().st_size
    for path, fmt in ((files16[0], "onnx"), (xml16, "openvino")):
        out = validate.RUNNERS[fmt](path, feeds)
        assert out["out_sample"].dtype == np.float32
        entry = validate.parity(ref, out, "fp16")
        assert entry["passed"], (fmt, entry)
        assert entry["rel_max"] > 1e-7  # really rounded: the figures are not of an fp32 file


def test_consolidate_merges_per_tensor_files_into_one(tmp_path):
    """What the TorchScript exporter writes for > 2 GB models (one file per tensor)
    becomes model.onnx + ONE model.onnx_data, with the same results."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    def make_model():  # onnx.save_model(save_as_external_data) edits its argument
        return helper.make_model(onnx.GraphProto.FromString(graph.SerializeToString()),
                                 opset_imports=[helper.make_opsetid("", 17)])

    model = make_model()
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(model, str(raw / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(raw.iterdir())) == 3
    dst = tmp_path / "out"
    dst.mkdir()
    files = to_onnx.consolidate(raw / "model.onnx", dst / "model.onnx")
    shutil.rmtree(raw)
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    assert sorted(p.name for p in dst.iterdir()) == ["model.onnx", "model.onnx_data"]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = ort.InferenceSession(str(dst / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5, atol=1e-5)
    # fp16 storage: half the bytes, float32 graph
    d16 = tmp_path / "out16"
    d16.mkdir()
    onnx.save_model(make_model(), str(d16 / "src.onnx"))
    to_onnx.consolidate(d16 / "src.onnx", d16 / "model.onnx", fp16=True)
    assert (d16 / "model.onnx_data").stat().st_size < (dst / "model.onnx_data").stat().st_size
    y16 = ort.InferenceSession(str(d16 / "model.onnx")).run(None, {"x": x})[0]
    assert y16.dtype == np.float32
    np.testing.assert_allclose(y16, x @ w1 @ w2, rtol=2e-2, atol=2e-2)


# --- the gate -------------------------------------------------------------------------------
def test_broken_export_fails_the_gate(sources, tmp_path, monkeypatch):
    break_export(monkeypatch, "text_encoder")  # the first component: the gate stops the export there
    out = tmp_path / "broken"
    res = CliRunner().invoke(export_command, [str(sources["sd1"]), str(out), "--format", "onnx"])
    assert res.exit_code == ValidationFailed.exit_code, res.output
    msg = res.stderr if hasattr(res, "stderr") else res.output
    assert "error:" in msg and "[text_encoder] onnx parity vs torch" in msg and "rel_max" in msg and "FAILED" in msg
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_gate_catches_a_corrupted_weight():
    ref = {"y": np.linspace(-3, 3, 1000, dtype=np.float32)}
    good = {"y": ref["y"] + np.float32(1e-6)}
    bad = {"y": ref["y"].copy()}
    bad["y"][17] += 0.05
    assert validate.parity(ref, good, "fp32")["passed"]
    entry = validate.parity(ref, bad, "fp32")
    assert not entry["passed"] and entry["rel_max"] > 1e-3
    with pytest.raises(ValidationFailed, match="rel_max"):
        validate.gate("unet", "onnx", entry, force=False)
    validate.gate("unet", "onnx", entry, force=True)  # forced: no raise
    nan = {"y": ref["y"].copy()}
    nan["y"][0] = np.nan
    assert not validate.parity(ref, nan, "fp32")["passed"]


def test_force_keeps_a_failed_export_marked_unvalidated(sources, tmp_path, monkeypatch):
    break_export(monkeypatch, "unet")
    out = tmp_path / "forced"
    res = CliRunner().invoke(export_command, [str(sources["sd1"]), str(out), "--format", "onnx", "--force"])
    assert res.exit_code == 0, res.output
    m = load_manifest(out, verify="sha256")
    assert m.validated is False and m.raw["export"]["forced"] is True
    assert m.components["unet"].variants["fp32"].parity["onnx"]["passed"] is False
    assert m.components["text_encoder"].variants["fp32"].parity["onnx"]["passed"] is True


# --- disk, location, existing folders --------------------------------------------------------
def test_disk_space_refused_before_work(sources, tmp_path):
    parent = tmp_path / "full"
    parent.mkdir()
    rec = Recorder()
    with pytest.raises(DiskSpaceError) as ei:
        export_model(load_source(str(sources["sd1"])), parent / "m", progress=rec, disk_free=lambda p: 12345)
    assert "12345 bytes" in str(ei.value) and "needs about" in str(ei.value)
    assert list(parent.iterdir()) == []
    assert not any(e.kind == "end" for e in rec.events)  # no step ran


def test_estimate_covers_the_files(exported, sources):
    path, _ = exported["sd1"]
    written = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    need = build.estimate_bytes(load_source(str(sources["sd1"])), ("onnx", "openvino"), "fp32")
    assert need >= written


def test_unwritable_location_is_a_clear_error(sources, tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    res = CliRunner().invoke(export_command, [str(sources["sd1"]), str(a_file / "sub" / "m")])
    assert res.exit_code == InvalidArgument.exit_code, res.output
    assert "error: cannot create the output location" in res.output and "is a file" in res.output
    assert "Traceback" not in res.output
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_read_only_parent_is_a_clear_error(sources, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InvalidArgument, match="not writable"):
            export_model(load_source(str(sources["sd1"])), ro / "m", progress=quiet)
    finally:
        ro.chmod(0o700)


def test_foreign_folder_is_refused_and_untouched(sources, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    res = CliRunner().invoke(export_command, [str(sources["sd1"]), str(out), "--format", "onnx"])
    assert res.exit_code == InvalidArgument.exit_code, res.output
    assert "not a cpuflow model folder" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 not really"
    assert _leftovers(tmp_path) == []


def test_reexport_replaces_the_previous_export(exported, sources, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(exported["sd1"][0], out)
    before = load_manifest(out, verify=False).raw["export"]["created"]
    time.sleep(1.1)
    export_model(load_source(str(sources["sd1"])), out, formats=("onnx",), progress=quiet)
    m = load_manifest(out, verify="sha256")
    assert m.raw["export"]["created"] != before and m.formats() == {"onnx"}
    assert not list(out.rglob("openvino_model.*"))  # old files gone with the old folder
    assert _leftovers(tmp_path) == []


def test_reexport_refuses_a_folder_holding_files_it_did_not_write(exported, sources, tmp_path):
    """Issue 17 item 9: a re-export replaces the whole folder, so files a user added
    there are named and the export refused, before any work; nothing is touched."""
    out = tmp_path / "m"
    shutil.copytree(exported["sd1"][0], out)
    (out / "notes.txt").write_text("my prompts")
    (out / "unet" / "my-lora.safetensors").write_bytes(b"lora")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    res = CliRunner().invoke(export_command, [str(sources["sd1"]), str(out), "--format", "onnx"])
    assert res.exit_code == InvalidArgument.exit_code, res.output
    assert "notes.txt" in res.output and "unet/my-lora.safetensors" in res.output and "move them" in res.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "notes.txt").read_text() == "my prompts"
    assert _leftovers(tmp_path) == []


def test_random_weights_cli_needs_arch(tmp_path):
    res = CliRunner().invoke(export_command, ["--random-weights", str(tmp_path / "m")])
    assert res.exit_code == InvalidArgument.exit_code and "--arch" in res.output
    res = CliRunner().invoke(export_command, [str(tmp_path / "m")])
    assert res.exit_code == InvalidArgument.exit_code and "SOURCE" in res.output
    res = CliRunner().invoke(export_command, ["--help"])
    assert res.exit_code == 0 and "Examples" in res.output and "--weights" in res.output


def test_cli_module_does_not_import_torch():
    code = ("import sys; sys.path.insert(0, %r); import export.cli; "
            "bad = [m for m in ('torch', 'diffusers', 'onnx', 'openvino') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)") % str(ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# --- kill -9 at any moment ---------------------------------------------------------------------
# Each attempt runs in a process forked from a forkserver that has imported the
# export stage once (a fresh interpreter per attempt would spend most of the test
# importing torch). The child reports progress events on a queue; it is killed
# with SIGKILL by the test (``delay`` s after an event began) or by itself (at a
# progress event, or at one of build's crash points between the final renames).
CHILD = """
import os, signal

from export import build
from export.sources import load_source


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def run(src, out, mode, arg, queue):
    if mode == "point":
        build._crash_point = lambda name: die() if name == arg else None

    def progress(ev):
        key = f"{ev.kind}:{ev.component}:{ev.stage}"
        queue.put(key)
        if mode == "event" and key == arg:
            die()

    build.export_model(load_source(src), out, formats=("onnx",), progress=progress)
    queue.put("DONE")
"""


@pytest.fixture(scope="module")
def kill_ctx(tmp_path_factory):
    import multiprocessing as mp

    folder = tmp_path_factory.mktemp("killchild")
    (folder / "kill_child.py").write_text(CHILD)
    sys.path.insert(0, str(folder))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["export.build", "export.sources", "kill_child"])
    yield ctx
    sys.path.remove(str(folder))


def _attempt(ctx, src: Path, out: Path, mode: str, arg: str, delay: float = 0.0) -> int | None:
    import kill_child

    queue = ctx.Queue()
    proc = ctx.Process(target=kill_child.run, args=(str(src), str(out), mode, arg, queue))
    proc.start()
    deadline = time.monotonic() + 240
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            key = queue.get(timeout=0.2)
        except Exception:  # queue.Empty
            continue
        if mode == "after" and key == arg:
            time.sleep(delay)
            proc.kill()
            break
    proc.join(60)
    queue.close()
    return proc.exitcode


def _state(out: Path) -> str | None:
    """None if OUT_DIR is absent, else the creation stamp of its complete export."""
    if not out.exists():
        return None
    return load_manifest(out, verify="sha256").raw["export"]["created"]


def test_kill_at_any_moment_leaves_old_or_nothing(sources, exported, kill_ctx, tmp_path):
    src = sources["sd1"]
    out = tmp_path / "work" / "m"
    out.parent.mkdir()
    killed = -signal.SIGKILL

    # no previous export: killed while the UNet is being exported -> nothing
    assert _attempt(kill_ctx, src, out, "after", "begin:unet:onnx export", delay=0.5) == killed
    assert _state(out) is None

    # a previous complete export, killed at several moments -> still the previous one
    shutil.copytree(exported["sd1"][0], out)
    previous = _state(out)
    for mode, arg, delay in (("after", "begin:text_encoder:onnx export", 0.2),
                             ("point", "staged", 0.0)):  # manifest written, not moved in yet
        assert _attempt(kill_ctx, src, out, mode, arg, delay) == killed, (mode, arg)
        assert _state(out) == previous, (mode, arg)
        # this attempt's staging folder is left; earlier ones were cleaned by this attempt
        assert len([p for p in out.parent.iterdir() if p.name.startswith(".m.staging-")]) == 1, (mode, arg)

    # the rerun succeeds and tidies what the kills left (staging folder, lock file)
    rec = Recorder()
    export_model(load_source(str(src)), out, formats=("onnx",), progress=rec)
    assert _state(out) not in (None, previous)
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert any("removed the unfinished export" in e.message for e in rec.events)


class Crash(BaseException):
    pass


@pytest.mark.parametrize("point", ["between-renames", "before-backup-delete"])
def test_crash_during_the_swap_is_repaired(tmp_path, monkeypatch, point):
    """The two renames of a re-export, crashed between them or before the backup
    is deleted. _move_into_place has no cleanup handler, so an exception at the
    crash seam leaves exactly what a kill -9 there leaves."""
    def fake_export(folder: Path, stamp: str) -> None:
        folder.mkdir()
        (folder / "weights.bin").write_text(stamp)
        # a manifest records its files, as a real export's does (a file it does not record is the user's)
        (folder / MANIFEST_NAME).write_text(json.dumps({"format": "cpuflow-model", "stamp": stamp,
                                                         "files": {"weights.bin": {}}}))

    out = tmp_path / "m"
    fake_export(out, "old")
    staging = tmp_path / ".m.staging-1234"
    fake_export(staging, "new")

    def crash(name):
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(build, "_crash_point", crash)
    with pytest.raises(Crash):
        build._move_into_place(staging, out)
    backup = tmp_path / ".m.cpuflow-backup"
    if point == "between-renames":
        assert not out.exists() and (backup / "weights.bin").read_text() == "old"
        assert build.recover(out)[0] == "restored the previous export from .m.cpuflow-backup"
        assert (out / "weights.bin").read_text() == "old"
    else:
        assert (out / "weights.bin").read_text() == "new" and backup.exists()
        assert build.recover(out)[0] == "removed the stale backup .m.cpuflow-backup"
        assert (out / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # staging cleaned too
