"""The tiny autoencoder (TAESD): export with --taesd, parity with diffusers'
AutoencoderTiny, `decoder="taesd"` end to end against diffusers'
StableDiffusionPipeline built with ``vae=AutoencoderTiny``, per-step previews
(API, CLI, server), the errors, and the bench stage.

One tiny sd1 model (helpers_tiny) plus one tiny AutoencoderTiny
(helpers_taesd) is exported to both formats once per session. Random weights:
these prove plumbing and parity, not image quality.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from helpers_images import psnr  # noqa: E402
from helpers_taesd import save_tiny_taesd_folder  # noqa: E402
from helpers_tiny import save_tiny_diffusers_folder  # noqa: E402
from PIL import Image  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.errors import InvalidArgument, SourceError  # noqa: E402
from cpuflow.manifest import MANIFEST_NAME, load_manifest  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
STEPS = 6
BACKENDS = ["openvino", "onnxruntime"]


_STATE: dict = {}


@pytest.fixture(scope="session")
def taesd_export(tmp_path_factory):
    """SimpleNamespace(src, taesd_dir, model, plain): the tiny sd1 diffusers folder,
    the tiny AutoencoderTiny folder, the export with --taesd (both formats), and
    a copy of that export whose manifest lists no tiny autoencoder."""
    if "t" not in _STATE:
        from export.build import export_model
        from export.sources import load_source
        from export.taesd import attach_taesd, load_taesd

        base = tmp_path_factory.mktemp("taesd")
        src = save_tiny_diffusers_folder(base / "src", "sd1", seed=0)
        taesd_dir = save_tiny_taesd_folder(base / "taesd", seed=0)
        loaded = load_source(str(src))
        attach_taesd(loaded, *load_taesd(str(taesd_dir)))
        model = export_model(loaded, base / "model", formats=("onnx", "openvino"), progress=lambda *a, **k: None)
        plain = base / "plain"
        shutil.copytree(model, plain)
        data = json.loads((plain / MANIFEST_NAME).read_text())
        for name in ("taesd_decoder", "taesd_encoder"):
            data["components"].pop(name)
        (plain / MANIFEST_NAME).write_text(json.dumps(data))
        _STATE["t"] = SimpleNamespace(src=Path(src), taesd_dir=Path(taesd_dir), model=Path(model), plain=plain)
    return _STATE["t"]


_PIPES: dict = {}


def cpuflow_pipe(folder: Path, backend: str) -> Pipeline:
    key = (str(folder), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(folder, backend=backend, precision="f32", threads=1, use_cache=False)
    return _PIPES[key]


@pytest.fixture(scope="module")
def torch_taesd(taesd_export):
    return diffusers.AutoencoderTiny.from_pretrained(taesd_export.taesd_dir).float().eval()


@pytest.fixture(scope="module")
def reference_pipe(taesd_export, torch_taesd):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(taesd_export.src, vae=torch_taesd, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- export ---------------------------------------------------------------------------------
def test_manifest_records_the_tiny_autoencoder(taesd_export):
    m = load_manifest(taesd_export.model, verify="sha256")
    for name in ("taesd_decoder", "taesd_encoder"):
        comp = m.components[name]
        assert comp.config["scaling_factor"] == 1.0 and comp.config["downscale"] == 8
        var = comp.variants["fp32"]
        assert set(var.files) == {"onnx", "openvino"}
        for fmt in ("onnx", "openvino"):
            assert var.parity[fmt]["passed"] and var.parity[fmt]["psnr_db"] >= 60
            assert all(p in m.files for p in var.files[fmt])
    assert m.components["taesd_decoder"].output("sample").shape[1] == 3
    entry = m.raw["export"]["taesd"]
    assert entry["quantized"] is False and entry["source"]["kind"] == "diffusers_folder"
    assert m.validated


@pytest.mark.parametrize("backend", BACKENDS)
def test_taesd_components_match_diffusers(taesd_export, torch_taesd, backend):
    model = cpuflow_pipe(taesd_export.model, backend).model
    rng = np.random.default_rng(3)
    lat = rng.standard_normal((1, 4, 6, 10), dtype=np.float32)          # 48x80: not the traced size
    with torch.no_grad():
        ref = torch_taesd.decode(torch.from_numpy(lat)).sample.numpy()
    got = model.run("taesd_decoder", model.latent_dims(80, 48, 1), {"latent_sample": lat})["sample"]
    assert got.shape == ref.shape
    p = psnr(got, ref, peak=2.0)
    assert p >= PSNR_MIN, f"taesd_decoder {backend}: {p:.1f} dB"

    pix = rng.uniform(-1, 1, (1, 3, 48, 80)).astype(np.float32)
    with torch.no_grad():
        ref = torch_taesd.encode(torch.from_numpy(pix)).latents.numpy()
    got = model.run("taesd_encoder", model.latent_dims(80, 48, 1), {"sample": pix})["latents"]
    assert got.shape == ref.shape == (1, 4, 6, 10)
    p = psnr(got, ref, peak=float(np.abs(ref).max()) * 2)
    assert p >= PSNR_MIN, f"taesd_encoder {backend}: {p:.1f} dB"


# --- generation parity --------------------------------------------------------------------------
def _diffusers_image(pipe, init=None):
    kw = dict(prompt="a red circle", negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5,
              generator=torch.Generator("cpu").manual_seed(7), output_type="pil")
    sched = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(sched.config)
    try:
        if init is None:
            return np.asarray(pipe(height=SIZE, width=SIZE, **kw).images[0])
        i2i = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
        i2i.set_progress_bar_config(disable=True)
        return np.asarray(i2i(image=init, strength=0.6, **kw).images[0])
    finally:
        pipe.scheduler = sched


@pytest.mark.parametrize("backend", BACKENDS)
def test_txt2img_with_taesd_matches_diffusers(taesd_export, reference_pipe, backend):
    ref = _diffusers_image(reference_pipe)
    res = cpuflow_pipe(taesd_export.model, backend).txt2img(
        "a red circle", watermark=False, steps=STEPS, sampler="euler", guidance=7.5, width=SIZE, height=SIZE, seed=7, decoder="taesd")
    got = np.asarray(res.images[0])
    assert got.shape == ref.shape and got.std() > 5          # a picture, not a flat clipped field
    p = psnr(got, ref)
    assert p >= PSNR_MIN, f"txt2img taesd {backend}: {p:.1f} dB"
    assert res.records[0]["decoder"] == "taesd" and "taesd_decoder" in res.timings
    assert "vae_decoder" not in res.timings
    full = cpuflow_pipe(taesd_export.model, backend).txt2img(
        "a red circle", steps=STEPS, sampler="euler", guidance=7.5, width=SIZE, height=SIZE, seed=7)
    assert psnr(np.asarray(full.images[0]), got) < 40           # the full VAE is really another decoder


@pytest.mark.parametrize("backend", BACKENDS)
def test_img2img_with_taesd_matches_diffusers(taesd_export, reference_pipe, backend):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = _diffusers_image(reference_pipe, init=init)
    res = cpuflow_pipe(taesd_export.model, backend).img2img(
        "a red circle", init, watermark=False, strength=0.6, steps=STEPS, sampler="euler", guidance=7.5, seed=7, decoder="taesd")
    p = psnr(np.asarray(res.images[0]), ref)
    assert p >= PSNR_MIN, f"img2img taesd {backend}: {p:.1f} dB"
    assert "taesd_encoder" in res.timings and "vae_encoder" not in res.timings


# --- previews -------------------------------------------------------------------------------------
def test_api_preview_callback_decodes_x0_with_taesd(taesd_export):
    from cpuflow.image import array_to_images
    from cpuflow.pipelines.model import StageTimer
    from cpuflow.pipelines.taesd import decode_taesd

    pipe = cpuflow_pipe(taesd_export.model, "onnxruntime")
    seen, x0s = [], {}
    res = pipe.txt2img("a red circle", steps=4, sampler="euler", guidance=7.5, width=SIZE, height=SIZE, seed=5,
                       preview=lambda img, info: seen.append((img, info)), preview_every=2,
                       progress=lambda ev: x0s.__setitem__(ev["step"], ev["x0"].copy()))
    assert [info["step"] for _, info in seen] == [2, 4]
    assert all(info["source"] == "taesd" and info["n_steps"] == 4 for _, info in seen)
    img, info = seen[0]
    want = array_to_images(decode_taesd(pipe.model, x0s[2], StageTimer()))[0]
    assert img.size == (SIZE, SIZE) and np.array_equal(np.asarray(img), np.asarray(want))
    assert res.images[0].size == (SIZE, SIZE)


def test_api_preview_without_taesd_is_the_latent_approximation(taesd_export):
    pipe = cpuflow_pipe(taesd_export.plain, "onnxruntime")
    seen = []
    pipe.txt2img("a red circle", steps=3, sampler="euler", width=SIZE, height=SIZE, seed=5,
                 preview=lambda img, info: seen.append((img.size, info["source"])), preview_every=1)
    assert seen == [((SIZE // 8, SIZE // 8), "approximation")] * 3
    with pytest.raises(InvalidArgument, match="preview_every"):
        pipe.txt2img("x", steps=2, preview=lambda *a: None, preview_every=0)


def test_cli_decoder_taesd_writes_previews(taesd_export, tmp_path):
    from cpuflow.cli import main
    out = tmp_path / "pic.png"
    r = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(taesd_export.model), "--steps", "4",
                                  "--sampler", "euler", "--seed", "3", "--decoder", "taesd", "--preview-every", "2",
                                  "--backend", "onnxruntime", "--threads", "1", "--no-cache", "-q",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "taesd" in r.output
    previews = sorted(p.name for p in tmp_path.glob("pic.preview-*.png"))
    assert previews == ["pic.preview-0002.png", "pic.preview-0004.png"]
    assert Image.open(tmp_path / previews[0]).size == (SIZE, SIZE)
    assert json.loads(Image.open(out).info["cpuflow"])["decoder"] == "taesd"


def test_decoder_taesd_without_taesd_is_a_clear_error(taesd_export, tmp_path):
    from cpuflow.cli import main
    r = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(taesd_export.plain), "--steps", "2",
                                  "--decoder", "taesd", "--backend", "onnxruntime", "--no-cache", "-q",
                                  "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2, r.output
    assert "taesd_decoder" in r.output and "--taesd" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(InvalidArgument, match="decoder must be one of"):
        cpuflow_pipe(taesd_export.plain, "onnxruntime").txt2img("x", decoder="tiny")


# --- export errors ------------------------------------------------------------------------------------
def test_taesd_source_errors(tmp_path, taesd_export):
    from export.cli import export_command
    from export.taesd import load_taesd

    with pytest.raises(InvalidArgument, match="--random-weights"):
        load_taesd("random")
    with pytest.raises(SourceError, match="offline"):          # HF_HUB_OFFLINE=1 in the tests
        load_taesd("madebyollin/taesd-not-cached")
    with pytest.raises(SourceError, match="not an AutoencoderTiny"):
        load_taesd(taesd_export.src / "vae")
    with pytest.raises(SourceError, match="no such folder"):
        load_taesd(str(tmp_path / "nothing" / "here"))
    # the CLI fails on a bad --taesd before loading the (slow) model, writing nothing
    r = CliRunner().invoke(export_command, [str(taesd_export.src), str(tmp_path / "out"), "--taesd", "random"])
    assert r.exit_code == 2 and "--random-weights" in r.output and not (tmp_path / "out").exists()
    r = CliRunner().invoke(export_command, [str(taesd_export.src), str(tmp_path / "out"),
                                            "--taesd", "madebyollin/taesd-not-cached"])
    assert r.exit_code == 8 and "offline" in r.output and not (tmp_path / "out").exists()


def test_random_taesd_is_the_default_architecture_and_seeded():
    from export.taesd import load_taesd
    a, info = load_taesd("random", random_weights=True, seed=1)
    b, _ = load_taesd("random", random_weights=True, seed=1)
    assert tuple(a.config.encoder_block_out_channels) == (64, 64, 64, 64) and info["kind"] == "random"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- server ---------------------------------------------------------------------------------------------
def test_server_previews_and_decoder_through_taesd(taesd_export):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cpuflow.config import GenerationRequest
    from cpuflow.pipelines.model import StageTimer
    from cpuflow.pipelines.taesd import decode_taesd
    from cpuflow.server.app import create_app
    from cpuflow.server.preview import make_preview

    pipe = cpuflow_pipe(taesd_export.model, "onnxruntime")
    plain = cpuflow_pipe(taesd_export.plain, "onnxruntime")
    c = TestClient(create_app({"tiny": pipe, "plain": plain}, preview_every=1), base_url="http://127.0.0.1:7860")
    models = {m["id"]: m for m in c.get("/api/models").json()["models"]}
    assert models["tiny"]["taesd"] is True and models["plain"]["taesd"] is False
    r = c.post("/api/generate", json={"prompt": "a red car", "steps": 3, "seed": 7, "sampler": "euler",
                                      "decoder": "taesd", "model": "tiny"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    events = []
    with c.stream("GET", f"/api/jobs/{job_id}/events") as resp:
        name = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "failed", "cancelled"):
                    break
    assert events[-1][0] == "done", events[-1]
    previews = [d["preview"] for _, d in events if d.get("preview")]
    assert previews and all(p.startswith("data:image/png;base64,") for p in previews)
    job = events[-1][1]
    assert job["params"]["decoder"] == "taesd" and job["images"][0]["record"]["decoder"] == "taesd"
    png = Image.open(io.BytesIO(c.get(job["images"][0]["url"]).content)).convert("RGB")
    direct = pipe(GenerationRequest(prompt="a red car", steps=3, seed=7, sampler="euler", decoder="taesd"))
    assert np.array_equal(np.asarray(png), np.asarray(direct.images[0]))
    # the server's preview of a model with TAESD is the TAESD decode of x0, whatever the size
    lat = np.random.default_rng(1).standard_normal((1, 4, 40, 40)).astype(np.float32)
    url = make_preview(pipe, {"x0": lat}, 320, 320)
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    from cpuflow.image import array_to_images
    want = array_to_images(decode_taesd(pipe.model, lat, StageTimer()))[0]
    want.thumbnail((256, 256))
    assert img.size == want.size == (256, 256) and np.array_equal(np.asarray(img), np.asarray(want))
    # decoder taesd on a model without it: refused up front, naming the fix
    r = c.post("/api/generate", json={"prompt": "x", "steps": 2, "decoder": "taesd", "model": "plain"})
    assert r.status_code == 422 and "--taesd" in r.text
    c.app.state.jobs.stop()


# --- bench ----------------------------------------------------------------------------------------------------
def test_bench_taesd_stage_and_e2e_decoder(taesd_export, tmp_path):
    from cpuflow.bench.cli import bench_command
    out = tmp_path / "b.json"
    r = CliRunner().invoke(bench_command, [str(taesd_export.model), "--backend", "onnxruntime", "--stages",
                                           "taesd,e2e", "--decoder", "taesd", "--repeat", "1", "--warmup", "0",
                                           "--steps", "2", "--threads", "1", "-q", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    col = data["configs"][0]
    assert col["stages"]["taesd"]["median_s"] > 0
    assert col["stages"]["e2e"]["breakdown"][0]["taesd_decoder"] > 0
    assert "vae_decoder" not in col["stages"]["e2e"]["breakdown"][0]
    assert "TAESD decode" in r.output and data["settings"]["decoder"] == "taesd"
    r = CliRunner().invoke(bench_command, [str(taesd_export.plain), "--stages", "taesd", "-q"])
    assert r.exit_code == 2 and "--taesd" in r.output


def test_cli_export_with_taesd_and_quantize_keeps_the_tiny_autoencoder_fp32(taesd_export, tmp_path):
    from export.cli import export_command

    out = tmp_path / "q"
    # ONNX only: the cheapest path through the same export code (the TAESD rule is format-independent)
    r = CliRunner().invoke(export_command, [str(taesd_export.src), str(out), "--format", "onnx",
                                            "--quantize", "int8-weights", "--taesd", str(taesd_export.taesd_dir)])
    assert r.exit_code == 0, r.output
    assert "[taesd] not quantized" in r.output
    m = load_manifest(out, verify="sha256")
    assert set(m.components["unet"].variants) == {"fp32", "int8-weights"}
    assert set(m.components["taesd_decoder"].variants) == {"fp32"}
    assert set(m.components["taesd_encoder"].variants) == {"fp32"}
    assert m.raw["export"]["taesd"]["quantized"] is False
    with Pipeline.load(out, backend="onnxruntime", precision="f32", threads=1, use_cache=False,
                       variant="int8-weights") as pipe:
        res = pipe.txt2img("a red circle", steps=2, width=SIZE, height=SIZE, seed=1, decoder="taesd")
    assert res.records[0]["variant"]["taesd_decoder"] == "fp32"
    assert res.records[0]["variant"]["unet"] == "int8-weights"
