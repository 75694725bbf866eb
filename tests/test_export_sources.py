"""The loading half of the export stage: export/sources.py, detect.py, safe_load.py.

Everything runs offline on tiny models (tests/helpers_tiny.py); the one
full-size build is marked slow (opt in with --runslow, see conftest.py).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"          # no network, ever (also patched below, in case it was imported)

import json
import pickle
import random
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers_tiny as ht  # noqa: E402
from cpuflow.errors import InvalidArgument, SourceError, UnsafeFileError  # noqa: E402
from export import checkpoint_keys as ck  # noqa: E402
from export import detect, safe_load, sources  # noqa: E402


# ------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _offline_empty_cache(tmp_path_factory, monkeypatch):
    """No network and an empty Hugging Face cache for every test."""
    import huggingface_hub.constants as hc

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    yield cache


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def tok_dirs(work):
    return {k: ht.write_tiny_tokenizer(work / f"tok-{k}", k) for k in ht.TINY_KINDS}


@pytest.fixture(scope="module")
def folders(work):
    return {k: ht.save_tiny_diffusers_folder(work / f"folder-{k}", k) for k in ht.TINY_KINDS}


@pytest.fixture(scope="module")
def components():
    return {k: ht.tiny_sd_components(k) for k in ht.TINY_KINDS}


def _assert_loaded_equals(lm, c):
    ht.assert_same_weights(c.unet, lm.unet, "unet")
    ht.assert_same_weights(c.vae, lm.vae, "vae")
    ht.assert_same_weights(c.text_encoder, lm.text_encoder, "text_encoder")
    for m in (lm.unet, lm.vae, lm.text_encoder):
        assert not m.training
        assert all(p.dtype == torch.float32 for p in m.parameters())


def _assert_same_outputs(lm, c):
    hidden = c.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ht.tiny_vocab_size(), (1, 77), generator=gen)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    h = torch.randn(1, 77, hidden, generator=gen)
    with torch.no_grad():
        assert torch.equal(c.text_encoder(ids)[0], lm.text_encoder(ids)[0])
        assert torch.equal(c.unet(x, 7, h).sample, lm.unet(x, 7, h).sample)
        assert torch.equal(c.vae.decode(x).sample, lm.vae.decode(x).sample)


def _tokenizer_ok(d: Path, pad: str):
    for f in sources.TOKENIZER_FILES:
        assert (d / f).is_file(), f
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(d))
    assert tok.pad_token == pad
    ids = tok("a photo of an astronaut", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id


class Evil:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------ helpers_tiny itself
def test_tiny_tokenizer_loads_with_transformers(tok_dirs):
    _tokenizer_ok(tok_dirs["sd1"], "<|endoftext|>")
    _tokenizer_ok(tok_dirs["sd2"], "!")
    vocab = json.loads((tok_dirs["sd1"] / "vocab.json").read_text())
    assert len(vocab) == ht.tiny_vocab_size() == ht.tiny_configs("sd1")["text_encoder"]["vocab_size"]
    assert (tok_dirs["sd1"] / "merges.txt").read_text().startswith("#version")


def test_tiny_components_are_seeded_and_distinct():
    a, b, c = ht.tiny_sd_components("sd1", 0), ht.tiny_sd_components("sd1", 0), ht.tiny_sd_components("sd1", 1)
    ht.assert_same_weights(a.unet, b.unet)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    # norm weights were perturbed: a swapped norm1/norm2 cannot go unnoticed
    assert not torch.equal(a.unet.down_blocks[0].resnets[0].norm1.weight,
                           a.unet.down_blocks[0].resnets[0].norm2.weight)


def test_tiny_folder_loads_in_diffusers_pipeline(folders, components):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folders["sd2-v"]), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!"
    c = components["sd2-v"]
    ht.assert_same_weights(c.text_encoder, pipe.text_encoder, "pipeline text encoder")  # no silent random init
    ht.assert_same_weights(c.unet, pipe.unet, "pipeline unet")


def test_reverse_mapping_matches_diffusers_converters(components):
    for kind in ("sd1", "sd2"):
        c = components[kind]
        cfg = ht.tiny_configs(kind)
        sds = ht.component_state_dicts(c)
        orig = ht.tiny_original_state_dict(kind, components=c)
        ht.assert_same_weights(sds["unet"], ck.unet_to_diffusers(orig, cfg["unet"]), f"{kind} unet")
        ht.assert_same_weights(sds["vae"], ck.vae_to_diffusers(orig, cfg["vae"]), f"{kind} vae")
        te = (ck.clip_to_diffusers(orig) if kind == "sd1" else
              ck.openclip_to_diffusers(orig, 2, cfg["text_encoder"]["hidden_size"]))
        ht.assert_same_weights(sds["text_encoder"], te, f"{kind} text encoder")


# ------------------------------------------------------------------ vendored configs
def test_vendored_configs_parse_and_match_diffusers():
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    for name, v2, size in (("sd15", False, 512), ("sd21-base", True, 512), ("sd21-v", True, 768)):
        cfg = detect.load_vendored(name)
        assert set(cfg) == {"model_index", "unet", "vae", "text_encoder", "scheduler", "tokenizer_config",
                            "special_tokens_map"}
        for f in ("vocab.json", "merges.txt"):
            assert not (detect.vendored_dir(name) / "tokenizer" / f).exists()
        # What diffusers derives from the official ldm yaml (v1-inference / v2-inference(-v)).
        unet = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "attention_resolutions": [4, 2, 1],
                "num_res_blocks": 2, "context_dim": 1024 if v2 else 768, "transformer_depth": 1,
                "in_channels": 4, "out_channels": 4}
        unet.update({"num_head_channels": 64, "use_linear_in_transformer": True} if v2 else {"num_heads": 8})
        orig = {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": 0.18215,
                                     "first_stage_config": {"params": {"ddconfig": {
                                         "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "in_channels": 3,
                                         "out_ch": 3, "z_channels": 4}}}}}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)    # image_size: deprecated there, fine here
            theirs_u = create_unet_diffusers_config_from_ldm(orig, {}, image_size=size)
            theirs_v = create_vae_diffusers_config_from_ldm(orig, {}, image_size=size)
        for k, v in theirs_u.items():
            if k in cfg["unet"]:
                got = cfg["unet"][k]
                assert (list(got) if isinstance(got, (list, tuple)) else got) == \
                    (list(v) if isinstance(v, (list, tuple)) else v), (name, k)
            else:
                assert v in (None, 1), (name, k, v)
        for k, v in theirs_v.items():
            got = cfg["vae"][k]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == \
                (list(v) if isinstance(v, (list, tuple)) else v), (name, k)
        assert cfg["scheduler"]["prediction_type"] == ("v_prediction" if name == "sd21-v" else "epsilon")
        assert cfg["special_tokens_map"]["pad_token"] == ("!" if v2 else "<|endoftext|>")


def test_vendored_configs_build_full_size_architectures():
    """Meta-device builds (no memory): parameter counts of the official models."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with init_empty_weights():
        for name, unet_params, text_params in (("sd15", 859_520_964, 123_060_480),
                                               ("sd21-v", 865_910_724, 340_387_840)):
            cfg = detect.load_vendored(name)
            assert count(UNet2DConditionModel.from_config(cfg["unet"])) == unet_params
            assert count(AutoencoderKL.from_config(cfg["vae"])) == 83_653_863
            te = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "torch_dtype")}
            assert count(CLIPTextModel(CLIPTextConfig(**te))) == text_params


def test_arch_and_argument_validation():
    with pytest.raises(InvalidArgument, match="sd15"):
        sources.load_source(None, random_weights=True, arch="sd3")
    with pytest.raises(InvalidArgument, match="arch"):
        sources.load_source(None, random_weights=True)
    with pytest.raises(InvalidArgument):
        sources.load_source("x.safetensors", random_weights=True, arch="sd15")
    with pytest.raises(InvalidArgument, match="source"):
        sources.load_source(None)
    with pytest.raises(InvalidArgument, match="prediction type"):
        sources.load_source(None, random_weights=True, arch="sd15", prediction_type="sample")
    assert detect.check_arch("sd21-v") == "sd21-v" and detect.check_arch("SD15") == "sd15"


# ------------------------------------------------------------------ diffusers folders
@pytest.mark.parametrize("kind,family,pt", [("sd1", "sd1", "epsilon"), ("sd2", "sd2", "epsilon"),
                                            ("sd2-v", "sd2", "v_prediction")])
def test_diffusers_folder(kind, family, pt, folders, components):
    msgs = []
    lm = sources.load_source(folders[kind], progress=msgs.append)
    assert (lm.family, lm.prediction_type, lm.default_size) == (family, pt, 64)
    assert lm.scheduler_config["prediction_type"] == pt
    assert lm.source["kind"] == "diffusers_folder" and len(lm.source["sha256"]) == 64
    assert set(lm.source) == {"kind", "name", "sha256"}
    assert lm.random_weights is False and lm.name == f"folder-{kind}"
    assert lm.tokenizer_dir == folders[kind] / "tokenizer"
    _tokenizer_ok(lm.tokenizer_dir, "!" if family == "sd2" else "<|endoftext|>")
    _assert_loaded_equals(lm, components[kind])
    assert any("loading unet" in m for m in msgs)


def test_folder_prediction_override_and_stable_hash(folders):
    a = sources.load_source(folders["sd2"], prediction_type="v_prediction")
    assert a.prediction_type == "v_prediction" and a.scheduler_config["prediction_type"] == "v_prediction"
    assert a.detection["prediction_type_decided_by"].startswith("override")
    b = sources.load_source(folders["sd2"])
    assert a.source["sha256"] == b.source["sha256"]
    with pytest.raises(SourceError, match="arch"):
        sources.load_source(folders["sd2"], arch="sd15")


def test_folder_with_legacy_key_names(folders, tmp_path, components):
    """Folders written by older tools: CLIP keys with ``text_model.``, VAE attention as query/key/value."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "legacy"
    shutil.copytree(folders["sd1"], d)
    te = d / "text_encoder" / "model.safetensors"
    sd = load_file(str(te))
    sd = {"text_model." + k: v for k, v in sd.items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(te))
    vf = d / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in load_file(str(vf)).items():
        for new, o in old.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        sd[k] = v
    assert any(".query." in k for k in sd)
    save_file(sd, str(vf))
    _assert_loaded_equals(sources.load_source(d), components["sd1"])


def test_folder_with_pickle_weights_is_refused(folders, tmp_path):
    import shutil

    d = tmp_path / "binfolder"
    shutil.copytree(folders["sd1"], d)
    from safetensors.torch import load_file

    sd = load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sd, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="allow-pickle"):
        sources.load_source(d)


def test_folder_missing_weights(folders, tmp_path):
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(folders["sd1"], d)
    (d / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SourceError, match="no weights"):
        sources.load_source(d)


# ------------------------------------------------------------------ single files
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd2-v"])
def test_single_file_roundtrip_exact(kind, work, tok_dirs, components):
    f = ht.save_tiny_single_file(work / f"rt-{kind}.safetensors", kind)
    msgs = []
    lm = sources.load_source(f, tokenizer=tok_dirs[kind], progress=msgs.append)
    assert lm.family == ht.expected_family(kind)
    assert lm.prediction_type == ht.expected_prediction_type(kind)
    assert lm.scheduler_config["prediction_type"] == lm.prediction_type
    assert lm.default_size == 64                        # modelspec.resolution
    assert "metadata" in lm.detection["prediction_type_decided_by"]
    assert lm.source == {"kind": "single_file", "name": f.name, "sha256": safe_load_sha(f)}
    _assert_loaded_equals(lm, components[kind])
    _assert_same_outputs(lm, components[kind])
    for stage in ("reading checkpoint", "converting unet", "converting vae", "converting text encoder"):
        assert any(m.startswith(stage) for m in msgs), (stage, msgs)
    if kind != "sd1":
        assert lm.text_encoder.config.num_hidden_layers == 2          # the extra (penultimate) block dropped
    assert lm.detection["ignored_keys"] >= 3                          # betas, alphas_cumprod, ...


def safe_load_sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_sd2_prediction_type_without_metadata(work, tok_dirs):
    f = ht.save_tiny_single_file(work / "model.safetensors", "sd2", metadata=False)
    lm = sources.load_source(f, tokenizer=tok_dirs["sd2"])
    # As diffusers: an SD 2.x file with nothing else to go by is taken as the 768 v-model.
    assert (lm.prediction_type, lm.default_size) == ("v_prediction", 768)
    assert lm.detection["prediction_type_decided_by"].startswith("default")
    lm = sources.load_source(f, tokenizer=tok_dirs["sd2"], prediction_type="epsilon")
    assert (lm.prediction_type, lm.default_size) == ("epsilon", 512)
    assert lm.scheduler_config["prediction_type"] == "epsilon"
    assert lm.detection["prediction_type_decided_by"].startswith("override")
    g = ht.save_tiny_single_file(work / "v2-1_512-ema-pruned.safetensors", "sd2", metadata=False)
    info = detect.detect_checkpoint(ht.tiny_original_state_dict("sd2"), filename=g.name)
    assert info.prediction_type == "epsilon" and "file name" in info.prediction_type_decided_by


def test_detection_rules_on_state_dicts(components):
    sd1 = ht.tiny_original_state_dict("sd1", components=components["sd1"])
    sd2 = ht.tiny_original_state_dict("sd2", components=components["sd2"])
    i1, i2 = detect.detect_checkpoint(sd1), detect.detect_checkpoint(sd2)
    assert (i1.family, i1.prediction_type, i1.default_size, i1.text_kind) == ("sd1", "epsilon", 512, "clip")
    assert (i2.family, i2.prediction_type, i2.default_size, i2.text_kind) == ("sd2", "v_prediction", 768, "openclip")
    assert i1.unet_config["attention_head_dim"] == 8 and i1.unet_config["use_linear_projection"] is False
    assert i2.unet_config["attention_head_dim"] == [1, 2] and i2.unet_config["use_linear_projection"] is True
    assert i2.text_config["num_hidden_layers"] == 2 and i2.text_config["hidden_act"] == "gelu"
    assert i1.unet_config["block_out_channels"] == [32, 64] and i1.vae_config["block_out_channels"] == [32, 32, 64, 64]
    assert i1.unet_config["cross_attention_dim"] == 128 and i2.unet_config["cross_attention_dim"] == 192
    # the hints, in order
    assert detect.detect_checkpoint(sd2, global_step=875000).prediction_type == "epsilon"
    assert detect.detect_checkpoint(sd2, global_step=110000).prediction_type == "v_prediction"
    assert detect.detect_checkpoint(sd2, metadata={"modelspec.architecture": "stable-diffusion-v2-512"}
                                    ).prediction_type == "epsilon"
    assert detect.detect_checkpoint(sd2, filename="768-v-ema.ckpt").prediction_type == "v_prediction"
    assert detect.detect_checkpoint(sd2, arch="sd21").prediction_type == "epsilon"
    assert detect.detect_checkpoint(dict(sd1, v_pred=torch.tensor([]))).prediction_type == "v_prediction"
    assert detect.detect_checkpoint(sd1, metadata={"ss_v_parameterization": "True"}).prediction_type == "v_prediction"
    with pytest.raises(SourceError, match="SD1"):
        detect.detect_checkpoint(sd1, arch="sd21-v")


def test_non_standard_widths_are_refused_with_what_was_expected(components):
    sd = dict(ht.tiny_original_state_dict("sd1", components=components["sd1"]))
    k = ck.CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
    sd[k] = torch.zeros(sd[k].shape[0], 100)
    with pytest.raises(SourceError, match="multiple of 64"):
        detect.detect_checkpoint(sd)
    sd = dict(ht.tiny_original_state_dict("sd1", components=components["sd1"]))
    k = ck.UNET_PREFIX + "input_blocks.0.0.weight"
    sd[k] = torch.zeros(32, 8, 3, 3)
    with pytest.raises(SourceError, match="instruct-pix2pix"):
        detect.detect_checkpoint(sd)
    # 9 channels is an inpainting UNet: exported since issue #13 (tests/test_inpaint.py), not refused


def test_mismatched_tensor_shape_is_a_source_error(work, tok_dirs, components):
    from safetensors.torch import save_file

    sd = dict(ht.tiny_original_state_dict("sd1", components=components["sd1"]))
    k = ck.UNET_PREFIX + "time_embed.2.weight"
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 1)
    f = work / "badshape.safetensors"
    save_file(sd, str(f))
    with pytest.raises(SourceError, match=r"wrong shape.*time_embedding"):
        sources.load_source(f, tokenizer=tok_dirs["sd1"])


def test_ckpt_refused_without_flag_and_loaded_with_it(work, tok_dirs, components, monkeypatch):
    f = ht.save_tiny_single_file(work / "tiny-sd2.ckpt", "sd2", fmt="ckpt")   # {"state_dict":..., "global_step": 875000}
    with pytest.raises(UnsafeFileError, match="allow-pickle") as e:
        sources.load_source(f, tokenizer=tok_dirs["sd2"])
    assert str(f) in str(e.value)
    # Unpickling in this process would be a bug: only the child process may call torch.load.
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("in-process torch.load")))
    lm = sources.load_source(f, tokenizer=tok_dirs["sd2"], allow_pickle=True)
    assert (lm.family, lm.prediction_type) == ("sd2", "epsilon")
    assert "global_step 875000" in lm.detection["prediction_type_decided_by"]
    assert lm.detection["global_step"] == 875000
    assert lm.source["kind"] == "single_file" and lm.source["name"] == "tiny-sd2.ckpt"
    _assert_loaded_equals(lm, components["sd2"])


def test_safetensors_content_named_ckpt_needs_no_flag(work, tok_dirs):
    f = ht.save_tiny_single_file(work / "really-safetensors.ckpt", "sd1")
    assert safe_load.sniff(f) == safe_load.SAFETENSORS
    assert sources.load_source(f, tokenizer=tok_dirs["sd1"]).family == "sd1"


# ------------------------------------------------------------------ security
def test_pickle_renamed_safetensors_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "MARKER"
    for i, payload in enumerate((pickle.dumps(Evil(marker), protocol=4), None)):
        f = tmp_path / f"evil{i}.safetensors"
        if payload is None:
            torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Evil(marker)}, f)   # zip container
        else:
            f.write_bytes(payload)
        for allow in (False, True):
            with pytest.raises(UnsafeFileError, match=r"not a safetensors file \(it is a pickle"):
                sources.load_source(f, allow_pickle=allow)
    assert not marker.exists()


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    raw = tmp_path / "evil.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(2)}, "x": Evil(marker)}, protocol=2))
    zipped = tmp_path / "evil-zip.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Evil(marker)}, zipped)
    assert zipfile.is_zipfile(zipped)
    for f in (raw, zipped):
        with pytest.raises(UnsafeFileError, match="allow-pickle"):
            sources.load_source(f)
        assert not marker.exists()
        with pytest.raises(UnsafeFileError, match="weights_only") as e:
            sources.load_source(f, allow_pickle=True)
        assert str(f) in str(e.value) and "weights_only=False" not in str(e.value)
        assert not marker.exists()


# ------------------------------------------------------------------ broken inputs
def _bad_files(d: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "truncated": (d / "truncated.safetensors", data[: len(data) // 2]),
        "lfs": (d / "pointer.safetensors", b"version https://git-lfs.github.com/spec/v1\n"
                b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4265146304\n"),
        "random": (d / "random.safetensors", random.Random(0).randbytes(4096)),
        "empty": (d / "empty.ckpt", b""),
        "badjson": (d / "badjson.safetensors", (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 32),
        "html": (d / "download.safetensors", b"<!DOCTYPE html><html><body>404</body></html>"),
    }
    out = {}
    for name, (p, content) in files.items():
        p.write_bytes(content)
        out[name] = p
    return out


def test_broken_files_are_source_errors_naming_the_file(work, tmp_path, tok_dirs):
    good = ht.save_tiny_single_file(work / "good.safetensors", "sd1")
    for name, p in _bad_files(tmp_path, good).items():
        for allow in (False, True):
            with pytest.raises(SourceError, match="not a checkpoint") as e:
                sources.load_source(p, tokenizer=tok_dirs["sd1"], allow_pickle=allow)
            assert str(p) in str(e.value), name
            assert not isinstance(e.value, UnsafeFileError)
    with pytest.raises(SourceError, match="git-lfs"):
        safe_load.sniff(tmp_path / "pointer.safetensors")
    with pytest.raises(SourceError, match="truncated"):
        safe_load.read_safetensors_header(tmp_path / "truncated.safetensors")


def test_truncated_ckpt_with_flag(work, tmp_path):
    good = ht.save_tiny_single_file(work / "good.ckpt", "sd1", fmt="ckpt")
    legacy = tmp_path / "legacy.ckpt"      # torch's pre-zip format: a bare pickle stream
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, legacy, _use_new_zipfile_serialization=False)
    cut_zip, cut_legacy = tmp_path / "cut.ckpt", tmp_path / "cut-legacy.ckpt"
    cut_zip.write_bytes(good.read_bytes()[:5000])             # caught by the zip directory check
    cut_legacy.write_bytes(legacy.read_bytes()[:3000])        # caught by torch.load in the child
    for p in (cut_zip, cut_legacy):
        with pytest.raises(SourceError, match="not a checkpoint") as e:
            sources.load_source(p, allow_pickle=True)
        assert str(p) in str(e.value) and not isinstance(e.value, UnsafeFileError)


def test_missing_paths_and_non_diffusers_folders(tmp_path, folders):
    with pytest.raises(SourceError, match="no such file") as e:
        sources.load_source(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(e.value)
    d = tmp_path / "just-a-folder"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="not a diffusers folder") as e:
        sources.load_source(d)
    assert str(d) in str(e.value)


def test_unknown_architecture_says_what_was_expected(tmp_path, folders):
    from safetensors.torch import save_file

    f = tmp_path / "resnet.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3), "conv1.weight": torch.zeros(3, 3, 1, 1)}, str(f))
    with pytest.raises(SourceError, match=r"unknown architecture.*expected.*model\.diffusion_model") as e:
        sources.load_source(f)
    assert str(f) in str(e.value)
    # a single diffusers component passed as if it were a checkpoint
    with pytest.raises(SourceError, match="diffusers folder"):
        sources.load_source(folders["sd1"] / "unet" / "diffusion_pytorch_model.safetensors")
    g = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(2)}, str(g))
    with pytest.raises(SourceError, match="SDXL"):
        sources.load_source(g)


# ------------------------------------------------------------------ hub and tokenizers
def test_hub_id_offline_is_a_source_error():
    with pytest.raises(SourceError, match=r"could not download stabilityai/sd-turbo: offline\? download it yourself"):
        sources.load_source("stabilityai/sd-turbo")
    assert sources.looks_like_hub_id("stabilityai/sd-turbo")
    assert not sources.looks_like_hub_id("models/x.safetensors") and not sources.looks_like_hub_id("./a/b")


def test_hub_id_uses_the_cache_like_a_folder(folders, _offline_empty_cache, components):
    """A cached snapshot (what snapshot_download leaves) loads offline, same path as a folder."""
    import shutil

    repo = _offline_empty_cache / "models--tiny--sd1"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(folders["sd1"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    lm = sources.load_source("tiny/sd1")
    assert lm.source["kind"] == "hub" and lm.source["name"] == "tiny/sd1" and lm.family == "sd1"
    _assert_loaded_equals(lm, components["sd1"])


def test_single_file_without_tokenizer(work):
    f = ht.save_tiny_single_file(work / "notok.safetensors", "sd1")
    with pytest.raises(SourceError, match="--tokenizer") as e:
        sources.load_source(f)
    assert "open-clip-torch" in str(e.value) and "write_clip_tokenizer_files" in str(e.value)


def test_single_file_tokenizer_from_hf_cache(work, tok_dirs, _offline_empty_cache):
    import shutil

    repo = _offline_empty_cache / "models--openai--clip-vit-large-patch14"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    for fn in sources.TOKENIZER_FILES:
        shutil.copyfile(tok_dirs["sd1"] / fn, snap / fn)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    f = ht.save_tiny_single_file(work / "cachetok.safetensors", "sd1")
    lm = sources.load_source(f)
    assert "openai/clip-vit-large-patch14" in lm.detection["tokenizer"]
    _tokenizer_ok(lm.tokenizer_dir, "<|endoftext|>")


def test_tokenizer_with_only_vocab_and_merges_gets_family_configs(work, tok_dirs, tmp_path):
    import shutil

    t = tmp_path / "bpe"
    t.mkdir()
    for fn in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_dirs["sd2"] / fn, t / fn)
    f = ht.save_tiny_single_file(work / "bpe-sd2.safetensors", "sd2")
    lm = sources.load_source(f, tokenizer=t)
    _tokenizer_ok(lm.tokenizer_dir, "!")                 # SD 2.x pads with "!"
    with pytest.raises(SourceError, match="lacks"):
        sources.load_source(f, tokenizer=tmp_path)


def test_folder_tokenizer_saved_by_transformers5(folders, tmp_path, tok_dirs):
    """transformers >= 5 saves a CLIP tokenizer as tokenizer.json only: vocab/merges are rebuilt."""
    import shutil

    from transformers import CLIPTokenizer

    d = tmp_path / "t5folder"
    shutil.copytree(folders["sd2"], d)
    shutil.rmtree(d / "tokenizer")
    original = CLIPTokenizer.from_pretrained(str(tok_dirs["sd2"]))
    original.save_pretrained(str(d / "tokenizer"))
    assert not (d / "tokenizer" / "vocab.json").exists()
    lm = sources.load_source(d)
    _tokenizer_ok(lm.tokenizer_dir, "!")
    rebuilt = CLIPTokenizer.from_pretrained(str(lm.tokenizer_dir))
    text = "a beautiful oil painting of a red car at night, high quality!"
    assert rebuilt(text, padding="max_length", max_length=77).input_ids == \
        original(text, padding="max_length", max_length=77).input_ids
    assert json.loads((lm.tokenizer_dir / "vocab.json").read_text()) == \
        json.loads((tok_dirs["sd2"] / "vocab.json").read_text())


# ------------------------------------------------------------------ random weights (full size)
@pytest.mark.slow
def test_random_weights_full_size_sd15(tok_dirs):
    lm = sources.load_source(None, random_weights=True, arch="sd15", seed=3, tokenizer=tok_dirs["sd1"])
    assert lm.random_weights and lm.source["kind"] == "random" and lm.name == "random-sd15"
    assert (lm.family, lm.prediction_type, lm.default_size) == ("sd1", "epsilon", 512)
    assert sum(p.numel() for p in lm.unet.parameters()) == 859_520_964
    assert lm.unet.config.cross_attention_dim == lm.text_encoder.config.hidden_size == 768
    assert not any(p.is_meta for p in lm.unet.parameters())
    first = lm.unet.conv_in.weight.detach().clone()
    del lm
    again = sources.load_source(None, random_weights=True, arch="sd15", seed=3, tokenizer=tok_dirs["sd1"])
    assert torch.equal(first, again.unet.conv_in.weight)


@pytest.mark.parametrize("arch, cls, proj", [("sd15-lcm", "LCMScheduler", 256), ("sd21-turbo", "EulerDiscreteScheduler", None)])
def test_few_step_latency_arches_apply_their_overrides(monkeypatch, tmp_path, arch, cls, proj):
    """--random-weights --arch sd15-lcm / sd21-turbo: the base arch's vendored configs (swapped for
    tiny ones here: full size is slow) with the published models' differences applied."""
    from helpers_tiny import tiny_configs, write_tiny_tokenizer

    from export import detect
    kind = "sd1" if arch == "sd15-lcm" else "sd2"
    real = detect.load_vendored

    def tiny(name):
        cfgs = real(name)
        cfgs.update({k: v for k, v in tiny_configs(kind).items()})
        return cfgs

    monkeypatch.setattr(detect, "load_vendored", tiny)
    m = sources.load_source(None, random_weights=True, arch=arch, tokenizer=write_tiny_tokenizer(tmp_path / "t", kind))
    assert m.scheduler_config["_class_name"] == cls
    assert m.unet.config.time_cond_proj_dim == proj
    if arch == "sd21-turbo":
        assert m.scheduler_config["timestep_spacing"] == "trailing"
    else:
        assert m.scheduler_config["original_inference_steps"] == 50
