"""Quantized variants at export time (`cpuflow export --quantize ...`).

One tiny SD 1.x model is exported once with every mode on both formats
(calibration kept small: 2 prompts x 3 steps); the tests read that folder, load
each variant with the runtime, and compare the fp32 files with a plain export
of the same weights. Random tiny weights: the PSNR figures prove the plumbing
and catch broken quantization (PSNR near 0), they say nothing about images.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("nncf")
pytest.importorskip("onnxruntime.quantization")

from click.testing import CliRunner  # noqa: E402
from helpers_tiny import save_tiny_diffusers_folder  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.errors import InvalidArgument, ModelError, ValidationFailed  # noqa: E402
from cpuflow.manifest import MANIFEST_NAME, load_manifest  # noqa: E402
from export import quantize as quant  # noqa: E402
from export import validate  # noqa: E402
from export.build import export_model  # noqa: E402
from export.calibrate import read_prompts, select_prompts  # noqa: E402
from export.cli import export_command  # noqa: E402
from export.sources import load_source  # noqa: E402

MODES = quant.MODES      # every mode, int8-7bit (OpenVINO only) included
FORMATS = ("onnx", "openvino")
BACKEND_OF = {"onnx": "onnxruntime", "openvino": "openvino"}


class Lines:
    def __init__(self):
        self.lines = []

    def __call__(self, ev):
        if ev.message:
            self.lines.append(ev.message)


@pytest.fixture(scope="module")
def plain(request, tmp_path_factory):
    """(diffusers source folder, its export WITHOUT --quantize)."""
    try:
        t = request.getfixturevalue("tiny_export")("sd1")
        return Path(t.src), Path(t.model)
    except pytest.FixtureLookupError:
        base = tmp_path_factory.mktemp("quant-plain")
        src = save_tiny_diffusers_folder(base / "src", "sd1", seed=0)
        return Path(src), export_model(load_source(str(src)), base / "model", progress=lambda ev: None)


@pytest.fixture(scope="module")
def quantized(plain, tmp_path_factory):
    """(model folder exported with every mode, progress lines)."""
    src, _ = plain
    rec = Lines()
    out = export_model(load_source(str(src)), tmp_path_factory.mktemp("quant") / "model",
                       quantize=MODES, calibration_size=2, calibration_steps=3, progress=rec)
    return out, rec.lines


def _raw(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


# --- what the export writes --------------------------------------------------------------
def test_each_mode_adds_a_variant_on_both_formats(quantized):
    folder, _ = quantized
    m = load_manifest(folder, verify="sha256")  # every new file recorded, hashes right
    assert m.validated
    unet = m.components["unet"]
    for mode in MODES:
        var = unet.variants[mode]
        formats = quant.FORMATS_OF_MODE.get(mode, FORMATS)     # int8-7bit: OpenVINO only
        assert set(var.files) == set(formats), mode
        for fmt in formats:
            stem = quant.STEMS[quant.kind_for(mode, "unet", fmt)]
            assert var.files[fmt][0] == (f"unet/model_{stem}.onnx" if fmt == "onnx"
                                         else f"unet/openvino_model_{stem}.xml")
            recipe = var.quantization[fmt]
            assert recipe["mode"] == mode and recipe["version"] and recipe["tool"]
            assert recipe["size"] == sum(m.files[p]["size"] for p in var.files[fmt])
            par = var.parity[fmt]
            assert par["passed"] and par["reference"] == "torch fp32"
            assert par["psnr_db"] >= quant.QUANT_TOLERANCE.psnr_db
            held = par["held_out"]
            # every call of the held-out run (as many as a calibration prompt's run), pooled
            assert held["points"] == m.raw["export"]["quantize"]["calibration"]["held_out_calls"] == \
                m.raw["export"]["quantize"]["calibration"]["captured_calls_per_prompt"] >= 3
            assert held["psnr_db"] >= 20 and held["psnr_db"] >= held["psnr_db_worst_call"]
            assert held["psnr"] == "pooled over every call of the run"
            assert par["gate"] == "held_out" and par["finite"]
        assert m.raw["components"]["unet"]["variants"][mode]["size"]
    # activation modes carry their calibration; the weight-only one does not need any
    for mode in ("int8", "hybrid"):
        for fmt in FORMATS:
            cal = unet.variants[mode].quantization[fmt]["calibration"]
            assert cal["prompts"] == 2 and cal["steps"] == 3 and cal["samples"] >= 6
            assert len(cal["prompts_sha256"]) == 16
    assert "calibration" not in unet.variants["int8-weights"].quantization["openvino"]
    hybrid_ov = unet.variants["hybrid"].quantization["openvino"]
    assert hybrid_ov["weight_compression"]["ignored_scope"] == {"types": ["Convolution"]}
    assert hybrid_ov["ignored_scope"]["names"] > 0 and hybrid_ov["ops"]["FakeQuantize"] > 0
    assert unet.variants["int8"].precision == "int8"
    # int8-7bit: int8's recipe, its weights in [-64, 64] (sums of two u8 x s8 products fit 16 bits
    # on CPUs without VNNI); int8's own weights use the full range
    seven = unet.variants["int8-7bit"].quantization["openvino"]
    assert seven["precision"] == "int8-7bit" and "7-bit range" in seven["weights"]
    assert seven["calibration"] == unet.variants["int8"].quantization["openvino"]["calibration"]
    assert {k: v for k, v in seven.items() if k not in ("weights", "precision", "mode", "seconds", "size")} == \
        {k: v for k, v in unet.variants["int8"].quantization["openvino"].items()
         if k not in ("weights", "precision", "mode", "seconds", "size")}
    import openvino as ov
    core = ov.Core()

    def weight_range(xml):
        consts = [op.get_data() for op in core.read_model(str(folder / xml)).get_ops()
                  if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
        assert consts, xml
        return min(int(c.min()) for c in consts), max(int(c.max()) for c in consts)
    lo, hi = weight_range(unet.variants["int8-7bit"].files["openvino"][0])
    assert -64 <= lo and hi <= 64, (lo, hi)
    lo8, hi8 = weight_range(unet.variants["int8"].files["openvino"][0])
    assert max(-lo8, hi8) > 64, (lo8, hi8)
    assert m.components["text_encoder"].variants["int8-7bit"].files == {
        "openvino": m.components["text_encoder"].variants["int8"].files["openvino"]}
    # the other components: OpenVINO weight-compressed in every mode (one shared file);
    # ONNX Runtime: text encoder dynamic int8 in int8, the VAE stays fp32
    te = m.components["text_encoder"]
    assert te.variants["int8"].quantization["onnx"]["method"] == "quantize_dynamic"
    assert te.variants["int8"].files["openvino"] == te.variants["int8-weights"].files["openvino"]
    assert te.variants["int8"].parity["onnx"]["gate"] == "torch" and te.variants["int8"].parity["onnx"]["passed"]
    for vae in ("vae_decoder", "vae_encoder"):
        comp = m.components[vae]
        for mode in MODES:
            assert set(comp.variants[mode].files) == {"openvino"}
    assert m.raw["export"]["quantize"]["modes"] == list(MODES)
    assert m.raw["export"]["quantize"]["calibration"]["backend"] == "openvino"


def test_quantized_files_are_smaller(quantized):
    folder, _ = quantized
    m = load_manifest(folder)
    size = lambda paths: sum(m.files[p]["size"] for p in paths)  # noqa: E731
    for fmt in FORMATS:
        fp32 = size(m.components["unet"].variants["fp32"].files[fmt])
        for mode in MODES:
            if fmt in quant.FORMATS_OF_MODE.get(mode, FORMATS):
                assert size(m.components["unet"].variants[mode].files[fmt]) < fp32, (fmt, mode)


def _auto_names(xml: bytes) -> bytes:
    """OpenVINO numbers the names of unnamed nodes (``Constant_4103``) from a
    process-wide counter, so two exports in one process differ there and only
    there; everything else (graph, shapes, offsets) must match byte for byte."""
    return re.sub(rb'(name|names)="([A-Za-z]+)(_[0-9]+)+"', rb'\1="\2_N"', xml)


def test_fp32_files_are_byte_identical_to_a_plain_export(plain, quantized):
    _, ref = plain
    folder, _ = quantized
    a, b = _raw(ref), _raw(folder)
    for name, comp in a["components"].items():
        assert b["components"][name]["variants"]["fp32"]["files"] == comp["variants"]["fp32"]["files"]
        for paths in comp["variants"]["fp32"]["files"].values():
            for p in paths:
                if p.endswith(".xml"):
                    assert _auto_names((ref / p).read_bytes()) == _auto_names((folder / p).read_bytes()), p
                else:
                    assert a["files"][p]["sha256"] == b["files"][p]["sha256"], p
    # and quantizing did not touch them: the manifest's fp32 records were taken
    # before quantization began
    load_manifest(folder, verify="sha256")
    # nothing else beside them: every file in the folder is recorded
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST_NAME} == set(b["files"])


def test_export_prints_psnr_per_variant(quantized):
    _, lines = quantized
    for fmt in FORMATS:
        for stem in ("int8-weights", "int8", "hybrid"):
            hits = [ln for ln in lines if ln.startswith(f"[unet] {fmt} {stem} (") and "PSNR" in ln]
            assert len(hits) == 1, (fmt, stem, lines[-20:])
            assert "dB vs torch" in hits[0] and "held-out" in hits[0] and "MB" in hits[0]
    assert any("calibration:" in ln and "UNet inputs" in ln for ln in lines)


# --- the runtime ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_loads_each_variant(quantized, fmt):
    folder, _ = quantized
    for mode in MODES:
        if fmt not in quant.FORMATS_OF_MODE.get(mode, FORMATS):   # int8-7bit on ONNX Runtime: a clear error
            with pytest.raises(ModelError, match=f"variant '{mode}' has no {fmt} files in this model"):
                Pipeline.load(folder, backend=BACKEND_OF[fmt], variant=mode, use_cache=False)
            continue
        with Pipeline.load(folder, backend=BACKEND_OF[fmt], variant=mode, precision="f32",
                           use_cache=False) as pipe:
            res = pipe.txt2img("a red car", steps=3, seed=5)
        img = np.asarray(res.images[0], dtype=np.float32)
        assert img.shape == (64, 64, 3) and np.isfinite(img).all()
        assert res.records[0]["variant"]["unet"] == mode


def test_default_variant_is_chosen_by_fidelity_and_recorded(quantized):
    """No --variant: the fastest variant whose recorded fidelity passes (cpuflow/variants.py)
    runs on every component that has it; the others run fp32; the record says which."""
    from cpuflow.cpu import int8_dot_products_exact
    from cpuflow.variants import INT8_ACTIVATIONS, MIN_FIDELITY_DB, choose_variant
    folder, _ = quantized
    m = load_manifest(folder)
    exact = int8_dot_products_exact()    # what the pipeline asks (cpuflow/pipelines/model.py)
    for fmt in FORMATS:
        choice = choose_variant(m, fmt, int8_exact=exact)
        passing = [v for v, f in choice.fidelity_db.items() if f is not None and f >= MIN_FIDELITY_DB
                   and (exact or v not in INT8_ACTIVATIONS[fmt])]
        assert choice.name == (passing[0] if passing else "fp32"), choice
        with Pipeline.load(folder, backend=BACKEND_OF[fmt], precision="f32", use_cache=False) as pipe:
            res = pipe.txt2img("a cat", steps=2, seed=1)
        variants = res.records[0]["variant"]
        for comp, ran in variants.items():
            has = fmt in m.components[comp].variants.get(choice.name, m.components[comp].variants["fp32"]).files
            assert ran == (choice.name if has else "fp32"), (fmt, comp, ran, choice)


# --- the int8 recipe: float scopes (issue 15) ----------------------------------------------------
def _ov_quantized_inputs(op) -> tuple[bool, bool]:
    """(an activation input comes through a FakeQuantize, a weight is stored as int8)
    for an OpenVINO op of a saved NNCF int8 IR (weights: i8 Constant -> Convert -> Multiply)."""
    fq = int8 = False
    for port in range(op.get_input_size()):
        todo, seen = [op.input_value(port).get_node()], 0
        while todo and seen < 8:
            node = todo.pop()
            seen += 1
            kind = node.get_type_name()
            if kind == "FakeQuantize":
                fq = True
            elif kind == "Constant":
                int8 = int8 or node.get_element_type().get_type_name() in ("i8", "u8")
            elif kind in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose", "Unsqueeze"):
                todo += [node.input_value(i).get_node() for i in range(node.get_input_size())]
    return fq, int8


def test_int8_keeps_the_float_scopes_float_on_both_formats(quantized):
    """The int8 UNet's Conv / MatMul / Gemm in the recipe's float scopes (conv_in, conv_out,
    conv_shortcut, proj_in / proj_out, feed-forward, the last up block) read float inputs
    and float weights; the others are int8; the manifest says which scopes matched."""
    import onnx
    import openvino as ov
    folder, _ = quantized
    m = load_manifest(folder)
    var = m.components["unet"].variants["int8"]
    # OpenVINO: no FakeQuantize and no int8 weight in front of a float-scope op
    model = ov.Core().read_model(str(m.path(var.files["openvino"][0])))
    ops = [op for op in model.get_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    scopes = quant.int8_float_scopes(op.get_friendly_name() for op in model.get_ops())
    assert "up_blocks.1 (last up block)" in scopes         # the tiny UNet has 2 up blocks
    kept = {n for names in quant.scope_matches((op.get_friendly_name() for op in ops), scopes).values()
            for n in names}
    convs_out = [op for op in ops if op.get_friendly_name() not in kept and op.get_type_name() == "Convolution"]
    assert kept and convs_out
    for op in ops:
        if op.get_friendly_name() in kept:
            assert _ov_quantized_inputs(op) == (False, False), op.get_friendly_name()
    for op in convs_out:
        assert _ov_quantized_inputs(op) == (True, True), op.get_friendly_name()
    recipe = var.quantization["openvino"]
    assert recipe["ignored_scope"]["total"] == len(kept) and recipe["smooth_quant"]["matmul"] == -1
    assert all(recipe["ignored_scope"]["nodes"][label] > 0 for label in scopes), recipe["ignored_scope"]
    # ONNX Runtime: a float-scope node's weight is the float initializer itself (no
    # DequantizeLinear: ORT runs it in float; an activation input may still be the
    # dequantized output of a quantized producer); every other Conv's weight is int8
    g = onnx.load(str(m.path(var.files["onnx"][0])), load_external_data=False).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    floats = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT}
    nodes = [n for n in g.node if n.op_type in quant.ORT_STATIC_OPS]
    kept = {n for names in quant.scope_matches((n.name for n in nodes), scopes).values() for n in names}
    weighted = [n for n in nodes if n.op_type != "MatMul" or made_by.get(n.input[1]) == "DequantizeLinear"
                or n.input[1] in floats]
    assert kept and all(n.input[1] in floats for n in weighted if n.name in kept)
    assert all(made_by.get(n.input[1]) == "DequantizeLinear" for n in nodes if n.op_type == "Conv" and n.name not in kept)
    ort_recipe = var.quantization["onnx"]
    assert ort_recipe["float_scopes"]["total"] == len(kept) > 0
    assert ort_recipe["excluded_nodes"]["count"] == len(kept) + ort_recipe["excluded_nodes"]["weightless_matmuls"] - \
        sum(1 for n in nodes if n.name in kept and n.op_type == "MatMul" and not any(
            i in {t.name for t in g.initializer} for i in n.input[:2]))


def test_int8_float_scopes_follow_module_names_of_any_sd_unet():
    """The rule reads diffusers module paths in every naming the export produces (ONNX node
    names, OpenVINO names from ONNX and from torch) and finds the last up block by its index
    (SD 1.x / 2.x: up_blocks.3, SDXL: up_blocks.2), whatever the model."""
    sd15 = ["/unet/conv_in/Conv", "/unet/up_blocks.3/resnets.2/conv1/Conv", "/unet/up_blocks.2/resnets.0/conv1/Conv",
            "/unet/down_blocks.0/attentions.0/transformer_blocks.0/ff/net.2/MatMul",
            "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul",
            "/unet/mid_block/attentions.0/proj_out/Conv/WithoutBiases",
            "/unet/up_blocks.1/resnets.0/conv_shortcut/Conv", "/unet/time_embedding/linear_1/Gemm",
            "/unet/conv_out/Conv", "/unet/up_blocks.0/upsamplers.0/conv/Conv", "/unet/diff_proj/MatMul"]
    scopes = quant.int8_float_scopes(sd15)
    got = quant.scope_matches(sd15, scopes)
    assert got["up_blocks.3 (last up block)"] == ["/unet/up_blocks.3/resnets.2/conv1/Conv"]
    floats = {n for v in got.values() for n in v}
    assert floats == {sd15[i] for i in (0, 1, 3, 5, 6, 8)}
    sdxl_torch = ["__module.unet.conv_in/aten::_convolution/Convolution",
                  "__module.unet.up_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k/aten::linear/MatMul",
                  "__module.unet.up_blocks.1.attentions.0.proj_in/aten::linear/MatMul",
                  "__module.unet.down_blocks.1.resnets.0.conv1/aten::_convolution/Convolution"]
    got = quant.scope_matches(sdxl_torch, quant.int8_float_scopes(sdxl_torch))
    assert got["up_blocks.2 (last up block)"] == [sdxl_torch[1]] and got["conv_in"] == [sdxl_torch[0]]
    assert got["proj_in / proj_out"] == [sdxl_torch[2]] and sdxl_torch[3] not in {n for v in got.values() for n in v}
    assert "last up block" not in " ".join(quant.int8_float_scopes(["/vae/conv_in/Conv"]))


def test_calibration_runs_at_the_models_default_guidance(plain, tmp_path):
    """The calibration trajectory is sampled at the manifest's default guidance (the
    shipped model's is 5, not the 7.5 every model used to get): the cond - uncond
    spread the int8 UNet sees is the one a default generation feeds it."""
    from export.calibrate import capture
    _, model = plain
    folder = shutil.copytree(model, tmp_path / "m")
    raw = _raw(folder)
    raw["defaults"] = {**raw.get("defaults", {}), "guidance": 3.0}
    (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    cal = capture(folder, ["a cat"], steps=2)
    assert cal.info["guidance"] == 3.0 and cal.samples[0]["sample"].shape[0] == 2
    other = capture(folder, ["a cat"], steps=2, guidance=7.5)
    assert other.info["guidance"] == 7.5
    assert not np.array_equal(cal.samples[-1]["sample"], other.samples[-1]["sample"])  # another trajectory


# --- pieces --------------------------------------------------------------------------------------
def test_weight_only_int8_error_is_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    q, scale, zp = quant.quantize_per_axis_uint8(w, 0)
    assert q.dtype == np.uint8 and scale.shape == (6,) and zp.shape == (6,)
    back = (q.astype(np.float32) - zp[:, None, None, None]) * scale[:, None, None, None]
    assert np.all(np.abs(back - w) <= scale[:, None, None, None] * 0.5 + 1e-6)
    q1, s1, _ = quant.quantize_per_axis_uint8(w.reshape(6, 45).T.copy(), 1)  # MatMul layout: axis = last
    assert np.allclose(s1, scale)


def test_gate_is_loose_but_catches_garbage():
    rng = np.random.default_rng(1)
    ref = {"out": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}
    ok = quant.parity_entry(ref, {"out": ref["out"] + 0.02 * rng.standard_normal(ref["out"].shape)})
    assert ok["passed"] and 30 < ok["psnr_db"] < 60
    for bad in (np.zeros_like(ref["out"]), rng.standard_normal(ref["out"].shape), ref["out"] * np.nan):
        assert not quant.parity_entry(ref, {"out": bad.astype(np.float32)})["passed"]


def test_broken_quantization_fails_the_export_unless_forced(plain, tmp_path, monkeypatch):
    """add_variants on a copy of a finished export, with a weight quantizer that
    writes garbage scales: ValidationFailed, or with force a variant marked failed."""
    _, ref = plain
    folder = tmp_path / "m"
    shutil.copytree(ref, folder)
    raw = _raw(folder)
    comps = {"text_encoder": raw["components"]["text_encoder"]}
    te = comps["text_encoder"]["variants"]["fp32"]["files"]["onnx"][0]
    hidden = comps["text_encoder"]["config"]["hidden_size"]
    feeds = {"inputs_embeds": 0.02 * np.random.default_rng(0).standard_normal((2, 77, hidden), dtype=np.float32)}
    checks = {"text_encoder": quant.Check(feeds, validate.run_onnx(folder / te, feeds))}
    real = quant.quantize_per_axis_uint8
    monkeypatch.setattr(quant, "quantize_per_axis_uint8",  # a mirrored code book: garbage weights
                        lambda w, axis: (lambda q, s, z: (255 - q, s, z))(*real(w, axis)))
    kwargs = dict(modes=("int8-weights",), formats=("onnx",), calibration=None, checks=checks,
                  step=lambda *a: _null(), info=lambda *a: None)
    with pytest.raises(ValidationFailed, match="PSNR"):
        quant.add_variants(folder, comps, force=False, **kwargs)
    out = quant.add_variants(folder, comps, force=True, **kwargs)
    assert not out.all_passed
    assert comps["text_encoder"]["variants"]["int8-weights"]["parity"]["onnx"]["passed"] is False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_quantize_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(InvalidArgument, match="more than the 64 prompts"):
        export_model(object(), tmp_path / "x", quantize=["int8"], calibration_size=65)
    with pytest.raises(InvalidArgument, match="unknown quantization mode"):
        export_model(object(), tmp_path / "x", quantize=["int4"])
    with pytest.raises(InvalidArgument, match="--weights fp32"):
        export_model(object(), tmp_path / "x", weights="fp16", quantize=["int8-weights"])
    with pytest.raises(InvalidArgument, match="int8-7bit makes openvino files only.*--format openvino"):
        export_model(object(), tmp_path / "x", formats=("onnx",), quantize=["int8-7bit"])
    empty = tmp_path / "p.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(InvalidArgument, match="no prompt"):
        read_prompts(empty)
    assert len(read_prompts()) == 64 and len(set(read_prompts())) == 64
    assert select_prompts(["a", "b", "c"], 2) == ["a", "b"]
    runner = CliRunner()
    res = runner.invoke(export_command, ["src", str(tmp_path / "o"), "--calibration-prompts", str(empty)])
    assert res.exit_code == 2 and "needs --quantize" in res.output
    res = runner.invoke(export_command, ["src", str(tmp_path / "o"), "--quantize", "int8",
                                         "--calibration-size", "100"])
    assert res.exit_code == 2 and "64 prompts" in res.output
    res = runner.invoke(export_command, ["src", str(tmp_path / "o"), "--format", "onnx", "--quantize", "int8-7bit"])
    assert res.exit_code == 2 and "openvino files only" in res.output and "--format both" in res.output
    assert not (tmp_path / "o").exists()


# --- slow tier: the full-size UNet ------------------------------------------------------------
@pytest.mark.slow
def test_full_size_random_sd15_quantized_export(tmp_path):
    """Every mode on the full SD 1.5 architecture (random weights, small
    calibration): fits in memory, passes its gates, the runtime picks int8."""
    import os
    import resource
    import time

    tok = Path(os.environ.get("CPUFLOW_CLIP_TOKENIZERS", ".cache/clip-tokenizers")) / "sd1"
    if not (tok / "vocab.json").exists():
        pytest.skip("needs the CLIP tokenizer files: bash scripts/fetch_clip_vocab.sh")
    rec = Lines()
    t0 = time.perf_counter()
    out = export_model(load_source(None, random_weights=True, arch="sd15", tokenizer=tok), tmp_path / "sd15",
                       quantize=MODES, calibration_size=4, calibration_steps=5, progress=rec)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"full-size quantized export: {seconds:.0f} s, peak RSS {peak_gb:.1f} GiB")
    print("\n".join(ln for ln in rec.lines if "PSNR" in ln or "calibration" in ln or "quantize" in ln))
    m = load_manifest(out, verify="sha256")
    assert m.validated
    for mode in MODES:
        for fmt in quant.FORMATS_OF_MODE.get(mode, FORMATS):
            assert m.components["unet"].variants[mode].parity[fmt]["passed"], (mode, fmt)
    with Pipeline.load(out, backend="openvino") as pipe:
        res = pipe.txt2img("a photo", steps=2, width=256, height=256, seed=0)
    from cpuflow.cpu import int8_dot_products_exact
    from cpuflow.variants import INT8_ACTIVATIONS
    ran = res.records[0]["variant"]["unet"]
    assert ran == "int8" if int8_dot_products_exact() else ran not in INT8_ACTIVATIONS["openvino"]
    assert np.isfinite(np.asarray(res.images[0], np.float32)).all()


# --- lean ORT calibration (issue #4) ---------------------------------------------------------
def _unet_feeds(model_path: Path, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    c, ctx = dims["sample"][1], (dims["encoder_hidden_states"][1] or 77, dims["encoder_hidden_states"][2])
    rng = np.random.default_rng(seed)
    return [{"sample": rng.standard_normal((2, c, 8, 8), dtype=np.float32),
             "timestep": np.array([901.0, 901.0], np.float32) - 100 * k,
             "encoder_hidden_states": (3 * rng.standard_normal((2, *ctx))).astype(np.float32)}
            for k in range(n)]


def test_lean_calibration_ranges_equal_onnxruntimes_calibrater(plain, tmp_path):
    """export/ort_calibration.py (graph-only, no weight copies) gives exactly the
    ranges onnxruntime's MinMaxCalibrater gives for every tensor quantize_static
    quantizes, and quantize_static writes the same int8 model from either cache."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, create_calibrator,
                                          quantize_static, save_tensors_data)

    from export import ort_calibration

    _, model = plain
    unet = tmp_path / "unet"
    shutil.copytree(model / "unet", unet, ignore=shutil.ignore_patterns("openvino_*"))
    src = unet / "model.onnx"
    samples = _unet_feeds(src, 3)

    cal = create_calibrator(src, list(quant.ORT_STATIC_OPS), augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                            extra_options={"max_intermediate_outputs": 32})
    cal.collect_data(quant._samples_reader(samples))
    theirs = cal.compute_data()
    del cal

    graph = onnx.load(str(src), load_external_data=False)
    exclude = quant.onnx_weightless_matmuls(graph)
    assert exclude  # the tiny UNet has attention
    ours = ort_calibration.calibrate_ranges(src, samples, op_types=quant.ORT_STATIC_OPS, exclude=exclude)
    assert sorted(p.name for p in unet.iterdir()) == sorted(p.name for p in (model / "unet").iterdir()
                                                            if not p.name.startswith("openvino_"))
    assert ours and set(ours) <= set(theirs.keys())
    for name, (lo, hi) in ours.items():
        t_lo, t_hi = theirs[name].range_value
        assert lo.dtype == t_lo.dtype == np.float32 and lo.shape == t_lo.shape
        np.testing.assert_array_equal(lo, t_lo, err_msg=name)
        np.testing.assert_array_equal(hi, t_hi, err_msg=name)
    # what is left out feeds / leaves only the excluded (weightless attention) MatMuls
    skipped = set(theirs.keys()) - set(ours)
    assert skipped
    kept_io = {t for n in graph.graph.node if n.op_type in quant.ORT_STATIC_OPS and n.name not in exclude
               for t in (*n.input, *n.output)}
    assert not skipped & kept_io

    outs = {}
    for tag, data in (("ort", theirs), ("lean", None)):
        cache = tmp_path / f"{tag}.json"
        if data is None:
            ort_calibration.save_cache(ours, cache)
        else:
            save_tensors_data(data, cache)
        dst = tmp_path / tag / "q.onnx"
        dst.parent.mkdir()
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(quant.ORT_STATIC_OPS), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=str(cache))
        m = onnx.load(str(dst))
        outs[tag] = ([(n.op_type, list(n.input), list(n.output)) for n in m.graph.node],
                     {t.name: numpy_helper.to_array(t) for t in m.graph.initializer})
    assert outs["ort"][0] == outs["lean"][0]
    assert outs["ort"][1].keys() == outs["lean"][1].keys()
    for k, v in outs["ort"][1].items():
        np.testing.assert_array_equal(v, outs["lean"][1][k], err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_many_in_a_child_process_gives_the_same_outputs(plain, monkeypatch, fmt):
    """Big files are validated in a spawned process (its memory goes back to the
    system when it ends): same outputs as in-process."""
    _, model = plain
    path = model / "unet" / ("model.onnx" if fmt == "onnx" else "openvino_model.xml")
    feeds = _unet_feeds(model / "unet" / "model.onnx", 2)
    here = quant.run_many(fmt, path, feeds)
    monkeypatch.setattr(quant, "CHILD_RUN_BYTES", 0)
    child = quant.run_many(fmt, path, feeds)
    assert len(child) == 2 and child[0].keys() == here[0].keys()
    for a, b in zip(here, child):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
