"""DeepCache (issue #15 item 4): the exported graphs against torch, and the
runtime's full-every-N schedule against full compute, on tiny random models.

Random tiny weights: the images are noise, so "close to full compute" is a
PSNR floor on noise images (measured 39-45 dB for N = 2, 3 on the tiny sd1
below), not a statement about picture quality; bench/README.md has the
full-size and shipped-model numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_images import psnr

torch = pytest.importorskip("torch", reason="exporting a tiny model needs the export extra")
pytest.importorskip("diffusers", reason="exporting a tiny model needs the export extra")

from cpuflow import Pipeline  # noqa: E402
from cpuflow.config import GenerationRequest  # noqa: E402
from cpuflow.errors import InvalidArgument, ManifestError, ModelError  # noqa: E402
from cpuflow.manifest import load_manifest, parse_manifest  # noqa: E402
from cpuflow.pipelines import deep_cache as rt  # noqa: E402

PROMPT = "a red car in the city at night"
TINY_FLOOR_DB = 30.0     # N = 2, 3 against full compute on the tiny sd1 (measured 39-45 dB)


@pytest.fixture(scope="module")
def dc_model(tmp_path_factory):
    """The tiny sd1 exported with --deep-cache, both formats."""
    from export.build import export_model
    from export.sources import load_source
    from helpers_tiny import save_tiny_diffusers_folder

    base = tmp_path_factory.mktemp("tiny-deepcache")
    src = save_tiny_diffusers_folder(base / "src", "sd1", seed=0)
    out = export_model(load_source(str(src)), base / "model", formats=("onnx", "openvino"), deep_cache=True,
                       progress=lambda *a, **k: None)
    return Path(src), Path(out)


# --- torch: the unit walk is diffusers' UNet, cut in two -------------------------------------
def _unet_and_spec(kind):
    from export.components import unet_spec
    if kind == "sdxl":
        from diffusers import UNet2DConditionModel
        from export.components_sdxl import unet_spec as sdxl_unet_spec
        from helpers_sdxl import TEXT_EMBEDS, tiny_sdxl_configs
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**tiny_sdxl_configs()["unet"]).eval()
        return unet, sdxl_unet_spec(unet, 77, TEXT_EMBEDS)
    from helpers_tiny import tiny_sd_components
    unet = tiny_sd_components(kind, seed=0).unet.float().eval()
    return unet, unet_spec(unet, 77)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_torch_walk_equals_diffusers_and_shallow_reproduces_full(kind):
    from export import deep_cache as dc
    unet, plain = _unet_and_spec(kind)
    feeds = plain.sample_inputs(plain.check_dims, seed=3)
    args = [torch.from_numpy(feeds[n]) for n in plain.input_names()]
    with torch.no_grad():
        want = plain.wrap(unet)(*args)
        for skips in (1, 2):
            full = dc.DeepCacheUNet(unet, plain.input_names(), skips, shallow=False)
            out, feature = full(*args)
            shallow = dc.DeepCacheUNet(unet, plain.input_names(), skips, shallow=True)
            again = shallow(*args, feature)
            assert psnr(out.numpy(), want.numpy(), peak=float(want.abs().max())) > 100
            assert psnr(again.numpy(), out.numpy(), peak=float(out.abs().max())) > 100
            # a stale feature changes the output: the shallow branch really uses it
            assert psnr(shallow(*args, feature * 1.5).numpy(), out.numpy(), peak=float(out.abs().max())) < 60
    specs = dc.specs(unet, plain)
    # SDXL's shallow branch (DownBlock2D / UpBlock2D) has no cross-attention: no text input
    assert ("encoder_hidden_states" in specs[dc.SHALLOW].input_names()) == (kind != "sdxl")


def test_unsupported_cut_is_refused():
    from export import deep_cache as dc
    unet, plain = _unet_and_spec("sd1")
    with pytest.raises(InvalidArgument, match="skips must be between 1 and 2"):
        dc.specs(unet, plain, skips=3)


# --- the exported graphs -------------------------------------------------------------------
def test_manifest_records_both_graphs_and_their_gate(dc_model):
    _, model = dc_model
    m = load_manifest(model, verify="sha256")
    full, shallow = m.components[rt.FULL], m.components[rt.SHALLOW]
    assert [s.name for s in full.outputs] == ["out_sample", "deep_feature"]
    assert [s.name for s in shallow.inputs][-1] == "deep_feature"
    assert full.output("deep_feature").shape == shallow.input("deep_feature").shape
    assert full.config["deep_cache"]["skips"] == 2
    assert m.raw["export"]["deep_cache"]["components"] == list(rt.COMPONENTS)
    for comp in (full, shallow):
        assert set(comp.variants) == {"fp32"}    # never quantized
        for fmt in ("onnx", "openvino"):
            par = comp.variants["fp32"].parity[fmt]
            assert par["passed"] and par["psnr_db"] >= 60 and par["rel_max"] <= 1e-3


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_graphs_against_plain_unet_and_torch(dc_model, fmt):
    """Full graph's out_sample = the plain exported UNet = diffusers' UNet; the
    shallow graph fed the full graph's feature = the full graph's output."""
    from diffusers import UNet2DConditionModel
    from export.validate import RUNNERS
    src, model = dc_model
    m = load_manifest(model)
    path = lambda c: model / m.components[c].variants["fp32"].model_file(fmt)  # noqa: E731
    rng = np.random.default_rng(7)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 7), dtype=np.float32),
             "timestep": np.array([801.0, 801.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 128), dtype=np.float32)}
    plain = RUNNERS[fmt](path("unet"), feeds)["out_sample"]
    full = RUNNERS[fmt](path(rt.FULL), feeds)
    shallow = RUNNERS[fmt](path(rt.SHALLOW), dict(feeds, deep_feature=full["deep_feature"]))["out_sample"]
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    with torch.no_grad():
        ref = unet(*(torch.from_numpy(feeds[n]) for n in feeds), return_dict=False)[0].numpy()
    peak = float(np.abs(ref).max())
    assert psnr(full["out_sample"], plain, peak=peak) > 100
    assert psnr(full["out_sample"], ref, peak=peak) > 80
    assert psnr(shallow, full["out_sample"], peak=peak) > 100


# --- the runtime ---------------------------------------------------------------------------
def _images(pipe, **kw):
    return [np.asarray(im) for im in pipe.txt2img(PROMPT, seed=11, steps=6, **kw).images]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_n1_is_the_plain_unet_and_n2_n3_stay_close(dc_model, backend):
    _, model = dc_model
    with Pipeline.load(model, backend=backend, precision="f32") as pipe:
        full = _images(pipe)
        assert all(np.array_equal(a, b) for a, b in zip(full, _images(pipe, deep_cache=1)))
        for n in (2, 3):
            got = pipe.txt2img(PROMPT, seed=11, steps=6, deep_cache=n)
            db = psnr(np.asarray(got.images[0]), full[0])
            assert TINY_FLOOR_DB <= db < 80, (n, db)   # close, but the shallow branch did run
            assert got.records[0]["deep_cache"] == n


def _record_unet_calls(pipe) -> list[tuple]:
    """Record (graph, sample batch, feature batch or None) of every UNet call ``pipe`` makes."""
    calls: list[tuple] = []
    real_run = pipe.model.run

    def spy(component, dims, feeds):
        if component.startswith("unet"):
            calls.append((component, feeds["sample"].shape[0],
                          None if rt.FEATURE not in feeds else feeds[rt.FEATURE].shape[0]))
        return real_run(component, dims, feeds)

    pipe.model.run = spy
    return calls


@pytest.mark.parametrize("sampler,guidance", [("heun", 7.5), ("euler_a", 7.5), ("ddim", 1.0)])
def test_schedule_counts_unet_calls_for_every_sampler(dc_model, sampler, guidance):
    """Call k runs the full graph when k % N == 0 (heun: 2 calls a step, counted
    as calls); with guidance the feature is batch 2, without it batch 1; each image
    of a request starts with a full call."""
    _, model = dc_model
    with Pipeline.load(model, backend="openvino", precision="f32") as pipe:
        calls = _record_unet_calls(pipe)
        res = pipe.txt2img(PROMPT, seed=3, steps=4, sampler=sampler, guidance=guidance, deep_cache=3, n_samples=2)
        per_image = len(calls) // 2
        assert per_image == (7 if sampler == "heun" else 4)   # heun: 2 calls a step, 1 for the last
        batch = 2 if guidance > 1 else 1
        for image in (calls[:per_image], calls[per_image:]):
            assert [c[0] for c in image] == [rt.FULL if k % 3 == 0 else rt.SHALLOW for k in range(per_image)]
            assert all(c[1] == batch and c[2] in (None, batch) for c in image)
        assert len(res.images) == 2


def test_bad_deep_cache_values_are_refused():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(InvalidArgument, match="deep_cache"):
            GenerationRequest(prompt="x", deep_cache=bad)
    assert GenerationRequest(prompt="x", deep_cache=1).deep_cache == 1


def test_folder_without_graphs_says_reexport(tiny_export):
    plain = tiny_export("sd1").model
    with Pipeline.load(plain, backend="onnxruntime", precision="f32") as pipe:
        with pytest.raises(ModelError, match="no DeepCache UNet graphs") as e:
            pipe.txt2img(PROMPT, seed=1, steps=2, deep_cache=2)
        assert "re-export" in e.value.hint and "--deep-cache" in e.value.hint
        pipe.txt2img(PROMPT, seed=1, steps=1, deep_cache=1)   # N = 1 needs no graphs


def test_cli_deep_cache(dc_model, tiny_export, tmp_path):
    from click.testing import CliRunner

    from cpuflow.cli import main
    _, model = dc_model
    ok = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(model), "--steps", "3", "--seed", "1",
                                   "--deep-cache", "2", "--out", str(tmp_path / "a.png"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert "deep cache every 2" in ok.output
    bad = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(model), "--deep-cache", "0",
                                    "--out", str(tmp_path / "b.png")])
    assert bad.exit_code == 2 and "deep_cache must be between 1" in bad.output
    missing = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(tiny_export("sd1").model),
                                        "--deep-cache", "3", "--out", str(tmp_path / "c.png")])
    assert missing.exit_code == 3 and "re-export" in missing.output
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_manifest_with_one_deepcache_graph_is_refused(dc_model):
    _, model = dc_model
    data = json.loads((model / "cpuflow.json").read_text())
    del data["components"][rt.SHALLOW]
    with pytest.raises(ManifestError, match="without its other DeepCache graph"):
        parse_manifest(model, data)


def test_low_memory_splits_the_guidance_pair_and_keeps_a_cache_per_branch(dc_model):
    """--low-memory runs [uncond, cond] as two batch-1 UNet calls (half the activation
    peak); with DeepCache each branch keeps its own deep feature, so the images
    match the batch-2 run's."""
    _, model = dc_model
    kw = dict(seed=11, steps=6, guidance=7.5)
    with Pipeline.load(model, backend="onnxruntime", precision="f32") as pipe:
        ref = {n: pipe.txt2img(PROMPT, deep_cache=n, **kw).images[0] for n in (None, 3)}
    with Pipeline.load(model, backend="onnxruntime", precision="f32", low_memory=True) as pipe:
        calls = _record_unet_calls(pipe)
        for n in (None, 3):
            calls.clear()
            got = pipe.txt2img(PROMPT, deep_cache=n, **kw).images[0]
            per_branch = len(calls) // 2        # the model's PLMS: 7 model calls for 6 steps
            assert len(calls) % 2 == 0 and per_branch >= 6, calls
            assert all(c[1] == 1 and c[2] in (None, 1) for c in calls), calls
            if n == 3:   # per branch: full, shallow, shallow, full, ... (calls alternate uncond / cond)
                for branch in (calls[0::2], calls[1::2]):
                    assert [c[0] for c in branch] == [rt.FULL if k % 3 == 0 else rt.SHALLOW
                                                      for k in range(per_branch)]
            assert psnr(np.asarray(got), np.asarray(ref[n])) >= 60, n
