"""The manifest is the contract: round trip, refusal of unknown / incomplete /
damaged folders, before any backend is touched."""
import json
from pathlib import Path

import pytest

from cpuflow.errors import IncompatibleModelError, IntegrityError, ManifestError, UnsafeFileError
from cpuflow.manifest import MANIFEST_NAME, load_manifest, record_all_files, safe_join, write_manifest


def _spec(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def make_manifest(root: Path, *, te_width=32, unet_ctx=32, unet_ch=4) -> dict:
    files = {}
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        (root / comp).mkdir(parents=True, exist_ok=True)
        (root / comp / "model.onnx").write_bytes(comp.encode() * 10)
        files[comp] = [f"{comp}/model.onnx"]
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.json").write_text("{}")

    def comp(inputs, outputs, name):
        return {"inputs": inputs, "outputs": outputs, "config": {},
                "variants": {"fp32": {"precision": "fp32", "quantization": None,
                                      "files": {"onnx": files[name]}, "parity": {}}}}
    data = {
        "name": "tiny", "family": "sd1", "prediction_type": "epsilon", "random_weights": True,
        "validated": True, "scheduler": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000},
        "latent": {"channels": 4, "downscale": 8, "scaling_factor": 0.18215, "shift_factor": None},
        "default_size": {"width": 64, "height": 64},
        "tokenizer": {"path": "tokenizer", "files": ["vocab.json"], "max_length": 77},
        "components": {
            "text_encoder": comp([_spec("input_ids", "int64", ["batch", 77])],
                                 [_spec("last_hidden_state", "float32", ["batch", 77, te_width])], "text_encoder"),
            "unet": comp([_spec("sample", "float32", ["batch", unet_ch, "latent_height", "latent_width"]),
                          _spec("timestep", "float32", ["batch"]),
                          _spec("encoder_hidden_states", "float32", ["batch", 77, unet_ctx])],
                         [_spec("out_sample", "float32", ["batch", unet_ch, "latent_height", "latent_width"])], "unet"),
            "vae_decoder": comp([_spec("latent_sample", "float32", ["batch", 4, "latent_height", "latent_width"])],
                                [_spec("sample", "float32", ["batch", 3, "height", "width"])], "vae_decoder"),
            "vae_encoder": comp([_spec("sample", "float32", ["batch", 3, "height", "width"])],
                                [_spec("latent_parameters", "float32", ["batch", 8, "latent_height", "latent_width"])],
                                "vae_encoder"),
        },
        "source": {"kind": "random", "name": "test", "sha256": ""},
        "export": {"tools": {}},
    }
    data["files"] = record_all_files(root)
    return data


def test_round_trip(tmp_path):
    data = make_manifest(tmp_path)
    write_manifest(tmp_path, data)
    m = load_manifest(tmp_path, verify="sha256")
    assert m.family == "sd1" and m.latent_channels == 4 and m.scaling_factor == pytest.approx(0.18215)
    assert m.components["unet"].input("sample").resolve({"batch": 2, "latent_height": 8, "latent_width": 8}) == (2, 4, 8, 8)
    assert len(m.model_hash) == 12
    assert not (tmp_path / (MANIFEST_NAME + ".tmp")).exists()


def test_unknown_schema_is_refused_with_advice(tmp_path):
    data = make_manifest(tmp_path)
    write_manifest(tmp_path, data)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["schema_version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="schema 99.*upgrade cpuflow"):
        load_manifest(tmp_path)


def test_incomplete_or_missing_manifest_refused(tmp_path):
    with pytest.raises(ManifestError, match="has no cpuflow.json"):
        load_manifest(tmp_path)
    data = make_manifest(tmp_path)
    data["complete"] = False
    data.update(format="cpuflow-model", schema_version=1)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="did not finish"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format": "cpuflow-model", "schema_vers')
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_missing_key_is_an_export_bug(tmp_path):
    data = make_manifest(tmp_path)
    del data["latent"]["scaling_factor"]
    with pytest.raises(ManifestError, match="scaling_factor"):
        write_manifest(tmp_path, data)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_damaged_files_refused_before_any_backend(tmp_path):
    write_manifest(tmp_path, make_manifest(tmp_path))
    f = tmp_path / "unet" / "model.onnx"
    good = f.read_bytes()
    f.write_bytes(good[:-3])
    with pytest.raises(IntegrityError, match="unet/model.onnx.*truncated"):
        load_manifest(tmp_path)
    f.write_bytes(bytes([good[0] ^ 1]) + good[1:])  # same size, one flipped bit
    load_manifest(tmp_path, verify="size")
    with pytest.raises(IntegrityError, match="sha256"):
        load_manifest(tmp_path, verify="sha256")
    f.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(IntegrityError, match="git-lfs pointer"):
        load_manifest(tmp_path)
    f.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_manifest(tmp_path)
    (tmp_path / "tokenizer" / "vocab.json").unlink()


def test_incompatible_components_name_both_sides(tmp_path):
    with pytest.raises(IncompatibleModelError, match="text_encoder width 64 .* cross-attention width 32"):
        write_manifest(tmp_path, make_manifest(tmp_path, te_width=64, unet_ctx=32))
    with pytest.raises(IncompatibleModelError, match="unet takes 8 input channels"):
        write_manifest(tmp_path, make_manifest(tmp_path, unet_ch=8))


@pytest.mark.parametrize("rel", ["../evil.bin", "/etc/passwd", "a/../../x", ""])
def test_paths_leaving_the_folder_refused(tmp_path, rel):
    with pytest.raises(UnsafeFileError):
        safe_join(tmp_path, rel)


def test_symlink_escape_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    model = tmp_path / "model"
    model.mkdir()
    (model / "link.bin").symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="outside"):
        safe_join(model, "link.bin")
