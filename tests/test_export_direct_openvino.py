"""The OpenVINO-only export path (``--format openvino``): torch -> OpenVINO IR
directly (export/torch_to_openvino.py), no ONNX intermediate.

Tiny random SD 1.5 and SDXL models: the direct export passes the same parity
gate as the ONNX path, its IR has the same input / output names, element types
and dynamic dimensions as the ONNX path's IR, ``--weights fp16`` compresses, and
cpuflow's images from it match diffusers >= 50 dB (float32, OpenVINO).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ov = pytest.importorskip("openvino")

from helpers_images import psnr  # noqa: E402

from cpuflow import Pipeline  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
STEPS = 4
PROMPT = "a photo of a red car"
SD1_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def _export(src, out, formats, weights="fp32"):
    from export.build import export_model
    from export.sources import load_source
    return export_model(load_source(str(src)), out, formats=formats, weights=weights, progress=lambda *a: None)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_export, tiny_sdxl_export):
    """{kind: (diffusers folder, direct OpenVINO-only export, ONNX-path export)} for sd1 and sdxl;
    the ONNX-path exports are the session's shared tiny exports (conftest.py)."""
    base = tmp_path_factory.mktemp("direct-ov")
    out = {}
    for kind, shared in (("sd1", tiny_export("sd1")), ("sdxl", tiny_sdxl_export)):
        direct = _export(shared.src, base / f"{kind}-direct", ("openvino",))
        out[kind] = (shared.src, direct, shared.model)
    return out


def _ports(xml):
    m = ov.Core().read_model(str(xml))
    return ([(sorted(p.get_names()), str(p.get_partial_shape()), str(p.get_element_type())) for p in m.inputs],
            [(sorted(p.get_names()), str(p.get_partial_shape()), str(p.get_element_type())) for p in m.outputs])


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_direct_export_passes_the_gate_and_records_its_converter(models, kind):
    _, direct, onnx_path = models[kind]
    m = json.loads((direct / "cpuflow.json").read_text())
    comps = SDXL_COMPONENTS if kind == "sdxl" else SD1_COMPONENTS
    assert m["validated"] is True and set(m["components"]) == set(comps)
    assert m["export"]["formats"] == ["openvino"]
    assert m["export"]["ir_converter"] == "openvino.convert_model(torch)"
    assert m["export"]["onnx_exporter"] is None
    for name in comps:
        var = m["components"][name]["variants"]["fp32"]
        assert set(var["files"]) == {"openvino"}
        assert var["parity"]["openvino"]["passed"]
        assert var["parity"]["openvino"]["rel_max"] <= 1e-4      # float32: operation order only
        assert not list((direct / name).glob("*.onnx*")), "no ONNX file on the direct path"
    ref = json.loads((onnx_path / "cpuflow.json").read_text())
    assert ref["export"]["ir_converter"] == "openvino.convert_model(onnx)"
    for name in comps:  # the manifest's I/O contract is the same
        for key in ("inputs", "outputs", "config"):
            assert m["components"][name][key] == ref["components"][name][key], (name, key)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_direct_ir_has_the_onnx_path_names_types_and_dynamic_dims(models, kind):
    _, direct, onnx_path = models[kind]
    for name in (SDXL_COMPONENTS if kind == "sdxl" else SD1_COMPONENTS):
        got = _ports(direct / name / "openvino_model.xml")
        want = _ports(onnx_path / name / "openvino_model.xml")
        assert got == want, f"{name}: direct {got} vs onnx path {want}"


def test_direct_export_fp16_weights_compresses(models, tmp_path):
    src, direct, _ = models["sd1"]
    half = _export(src, tmp_path / "fp16", ("openvino",), weights="fp16")
    m = json.loads((half / "cpuflow.json").read_text())
    assert m["validated"] is True and m["export"]["weights_dtype"] == "fp16"
    unet = m["components"]["unet"]["variants"]["fp32"]
    assert unet["precision"] == "fp16-weights" and unet["parity"]["openvino"]["passed"]
    full = (direct / "unet" / "openvino_model.bin").stat().st_size
    small = (half / "unet" / "openvino_model.bin").stat().st_size
    assert small < 0.6 * full, (small, full)
    assert _ports(half / "unet" / "openvino_model.xml") == _ports(direct / "unet" / "openvino_model.xml")


def test_sd1_direct_export_matches_diffusers(models):
    src, direct, _ = models["sd1"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = np.asarray(pipe("a red circle", negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5,
                          height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(7)).images[0])
    with Pipeline.load(direct, backend="openvino", precision="f32", threads=1, use_cache=False) as cf:
        res = cf.txt2img("a red circle", watermark=False, negative_prompt="", steps=STEPS, sampler="euler", guidance=7.5,
                         width=SIZE, height=SIZE, seed=7)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{p:.1f} dB"


def test_sdxl_direct_export_matches_diffusers(models):
    src, direct, _ = models["sdxl"]
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
               height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ref = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    with Pipeline.load(direct, backend="openvino", precision="f32", threads=1, use_cache=False) as cf:
        res = cf.txt2img(PROMPT, watermark=False, negative_prompt="blurry", steps=STEPS, sampler="euler", guidance=5.0,
                         width=SIZE, height=SIZE, seed=3)
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"{p:.1f} dB"


def test_direct_path_keeps_the_disk_estimate_lean(models):
    """No ONNX intermediate: the OpenVINO-only estimate has no float32 scratch copy."""
    from export.build import estimate_bytes
    from export.sources import load_source
    loaded = load_source(str(models["sd1"][0]))
    assert estimate_bytes(loaded, ("openvino",), "fp32") < estimate_bytes(loaded, ("onnx", "openvino"), "fp32") / 1.5
