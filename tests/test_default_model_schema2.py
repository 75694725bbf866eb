"""The shipped model after its re-export to manifest schema 2
(scripts/reexport_default_model.py, issue #14): every weight and variant kept,
the images it gave as a schema-1 export unchanged, and long prompts, clip skip
and textual-inversion embeddings now work on it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cpuflow import Pipeline
from cpuflow.cli import main
from cpuflow.manifest import load_manifest
from cpuflow.pipelines.model import shipped_model_dir

pytestmark = pytest.mark.skipif(not (shipped_model_dir() / "cpuflow.json").exists(),
                                reason="the shipped model is not built in this checkout")

# sha256 of the weights files of the schema-1 export (commit 051eadc): the
# re-export must leave them byte for byte
SCHEMA_1_WEIGHT_FILES = {
    "unet/model.onnx_data": "32030015c481f905b9e2992b8b50e13f69efab2674bc18d63071b4855813b850",
    "unet/openvino_model.bin": "4199f5a235e9a99ce2ed6c0aaf17f744c52c7468d0c90a0b39f72b9efcf84148",
    "vae_decoder/model.onnx_data": "4171b21b9ee94e3f2a5c2e96f3ce0bbd2ce3695324ec4bb39b39a1889004e2fd",
    "vae_decoder/openvino_model.bin": "31ad50b1a6546ece3633e4c6938c09d74291abcf6f1a3464d55bf33a11752265",
    "vae_encoder/model.onnx_data": "d610b467ad43b5c14f6354095aeacc6badab578ec3da469ef3f5ffb346d60c91",
    "vae_encoder/openvino_model.bin": "c7a1878194ae9464fae30ad959497f6fc61471eeeea368750815df2acb42e6c7",
    "unet/model_int8-weights.onnx_data": "49b35f4a815e71013f3be6996e1f87d607cd4f374f6930da53e058f43caff600",
    "unet/openvino_model_int8-weights.bin": "e8509f8488089bb5e6db442819e135ac521bd1d762ad270b105549eacdbc6a3a",
    "vae_decoder/openvino_model_int8-weights.bin": "33a04f5fe05ee27e1902026a242e08d5138d516ddec39dfb12fe36062b93a538",
    "vae_encoder/openvino_model_int8-weights.bin": "61371a449d29e179844136198c1061106dc6e11476292757d6c07569c94837a3",
}
# the UNet's int8 variant, re-made with issue 15's recipe (scripts/reexport_default_model.py
# --requantize int8): only these files changed, every other weights file is the schema-1 one
REQUANTIZED_FILES = {
    "unet/model_int8.onnx": "9eafa25a73ad728c4b18610c01140fa3147c3751fe8cf24ad5071c723060bc71",
    "unet/model_int8.onnx_data": "59c7b07f3106f0632acc19e2d61e8ea2baa1d4522a3f1f44d37831c2945a1b15",
    "unet/openvino_model_int8.bin": "6048c75015693a37057136fd38b334f1628f0a5ec15f6c54a576b20b3a86d941",
    "unet/openvino_model_int8.xml": "4904dbb2e9a60d00fb2876eebd7c80a0847505b791659bcad195c2442051444f",
}
# the UNet's int8-7bit variant (OpenVINO only, for CPUs without VNNI; issue #15), added by
# scripts/reexport_default_model.py --requantize int8-7bit: two new files, nothing else changed
INT8_7BIT_FILES = {
    "unet/openvino_model_int8-7bit.bin": "600c8ead484ac2fb11adc0650b6d59ab2d05c5fb5e5b91d4f56304536cde9286",
    "unet/openvino_model_int8-7bit.xml": "20bd5c7b02a77ed2cab073f7309d0a3294a4cc8819891c16be3c8f82c6600b26",
}
# sha256 over (name, float32 bytes) of the text encoder's torch state dict
# rebuilt from the schema-1 export's fp32 ONNX (export/rebuild_from_onnx.py),
# token table included (the UNet's and VAE's weights files are unchanged, above)
SCHEMA_1_TEXT_ENCODER_DIGEST = "a3ee5f29100a2a74526255fb6253f0c3ca8004db44e01f9b4fb06f8bb561a576"
PROMPT = "a red circle on a blue background"


def _run(*args):
    return CliRunner().invoke(main, ["generate", *map(str, args)])


def test_schema_2_with_every_variant_and_record_kept():
    m = load_manifest(shipped_model_dir(), verify="hash")
    raw = m.raw
    assert raw["schema_version"] == 2 and raw["validated"] and raw["name"] == "cpuflow-toyworld"
    for comp in m.components.values():
        assert set(comp.variants) - {"int8-7bit"} == {"fp32", "int8-weights", "int8"}, comp.name
        if "int8-7bit" in comp.variants:     # OpenVINO files only; the other components' are int8's own
            assert set(comp.variants["int8-7bit"].files) == {"openvino"}, comp.name
            assert (comp.name == "unet") or (comp.variants["int8-7bit"].files == {
                "openvino": comp.variants["int8"].files["openvino"]}), comp.name
        assert all(p["passed"] for v in comp.variants.values() for p in v.parity.values()), comp.name
    te = m.components["text_encoder"]
    assert [s.name for s in te.inputs] == ["inputs_embeds"]
    assert [(s.name, s.shape) for s in te.outputs] == [("last_hidden_state", ("batch", 77, 64)),
                                                     ("hidden_states", ("batch", 4, 77, 64))]
    table = np.load(m.path(te.config["token_embeddings"]["path"]), allow_pickle=False)
    assert table.shape == (585, 64) and table.dtype == np.float32
    assert m.components["unet"].input("encoder_hidden_states").shape == ("batch", "text_length", 64)
    # no defaults.variant since issue #15's pooled figure: the gate picks (int8, tests/test_variant_choice.py)
    assert raw["defaults"] == {"guidance": 5.0, "steps": 20, "precision": "f32",
                               "note": "trained on coloured shapes; see bench/default_model_training.md"}
    assert raw["export"]["reexport"]["schema_from"] == 1
    for rel, digest in {**SCHEMA_1_WEIGHT_FILES, **REQUANTIZED_FILES, **INT8_7BIT_FILES}.items():  # verify="hash" checked the files
        assert raw["files"][rel]["sha256"] == digest, rel
    assert [r["files"] for r in raw["export"]["requantize_earlier"]] == [sorted(REQUANTIZED_FILES)]
    assert raw["export"]["requantize"]["files"] == sorted(INT8_7BIT_FILES)
    assert raw["export"]["requantize"]["modes"] == ["int8-7bit"]
    # the held-out figures re-measured over every call (scripts/reexport_default_model.py --remeasure)
    assert raw["export"]["remeasure"]["held_out"]["held_out_calls"] == 11
    for mode in ("int8-weights", "int8", "int8-7bit"):
        for held in (p["held_out"] for p in m.components["unet"].variants[mode].parity.values()):
            assert held["points"] == 11 and held["psnr_db"] >= held["psnr_db_worst_call"], mode


def test_text_encoder_weights_are_the_schema_1_exports():
    """The text encoder rebuilt from the re-exported graph and token table (checked
    against that graph to >= 100 dB) holds exactly the schema-1 export's weights."""
    pytest.importorskip("transformers")
    from transformers import CLIPTextConfig, CLIPTextModel

    from export.rebuild_from_onnx import check_against_onnx, load_text_encoder, text_encoder_check
    from export.train_default import TEXT_CONFIG
    m = json.loads((shipped_model_dir() / "cpuflow.json").read_text())
    tok = m["tokenizer"]
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, vocab_size=585, bos_token_id=tok["bos_token_id"],
                                        eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"])).eval()
    prefix = next(iter(text.state_dict())).split("embeddings")[0]
    load_text_encoder(text, shipped_model_dir(), m, prefix)
    assert check_against_onnx(*text_encoder_check(text, shipped_model_dir(), m, np.random.default_rng(0))) >= 100
    state = text.state_dict()
    h = hashlib.sha256()
    for k in sorted(state):
        if not k.endswith("position_ids"):
            h.update(k.encode())
            h.update(state[k].contiguous().numpy().tobytes())
    assert h.hexdigest() == SCHEMA_1_TEXT_ENCODER_DIGEST


@pytest.fixture(scope="module")
def schema_1(tmp_path_factory):
    from helpers_schema1 import schema_1_copy
    return schema_1_copy(shipped_model_dir(), tmp_path_factory.mktemp("schema1") / "default")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_images_equal_the_schema_1_exports(schema_1, backend):
    """txt2img (the model's defaults, and guidance 7.5 with a negative prompt) and
    img2img give the schema-1 export's images bit for bit."""
    init = Image.fromarray(np.random.default_rng(3).uniform(0, 255, (64, 64, 3)).astype(np.uint8))
    got = []
    for model in (schema_1, None):   # the schema-1 copy holds fp32 only
        with Pipeline.load(model, backend=backend, variant="fp32", threads=2, use_cache=False) as p:
            got.append([np.asarray(p.txt2img(PROMPT, seed=7, steps=8).images[0]),
                        np.asarray(p.txt2img("a red circle", negative_prompt="blue", seed=9, steps=4,
                                             guidance=7.5).images[0]),
                        np.asarray(p.img2img("a green square", init, strength=0.6, seed=8, steps=8).images[0])])
    for old, new in zip(*got):
        assert np.array_equal(old, new)


def test_long_prompts_clip_skip_and_embeddings_work_from_the_cli(tmp_path):
    """No "re-export" on the shipped model any more: 7 chunks, clip skip 2 and an
    embedding all run. The embedding holds the token-table row of "red": the
    prompt that calls it gives exactly the image of the prompt with the word."""
    from safetensors.numpy import save_file

    from cpuflow.tokenizer import ClipTokenizer
    m = load_manifest(shipped_model_dir(), verify=False)
    table = np.load(m.path(m.components["text_encoder"].config["token_embeddings"]["path"]), allow_pickle=False)
    red = ClipTokenizer.from_dir(Path(m.path(m.raw["tokenizer"]["path"]))).token_id("red</w>")
    emb = tmp_path / "crimsonish.safetensors"
    save_file({"emb_params": np.asarray(table[red:red + 1], np.float32)}, str(emb))
    common = ["--steps", 6, "--seed", 5, "-q"]
    long = PROMPT + ", " + ", ".join(["a red car in the city at night"] * 25)
    outs = {}
    for key, args in {"plain": [PROMPT], "long": [long], "skip2": [PROMPT, "--clip-skip", 2],
                      "word": [PROMPT], "emb": ["a crimsonish circle on a blue background", "--embedding", emb]
                      }.items():
        r = _run(*args, *common, "--out", tmp_path / f"{key}.png")
        assert r.exit_code == 0 and "re-export" not in r.output and "warning" not in r.output, (key, r.output)
        outs[key] = Image.open(tmp_path / f"{key}.png")
    px = {k: np.asarray(v.convert("RGB")) for k, v in outs.items()}
    assert not np.array_equal(px["plain"], px["long"])
    assert not np.array_equal(px["plain"], px["skip2"])
    assert "Clip skip: 2" in outs["skip2"].info["parameters"]
    assert np.array_equal(px["emb"], px["word"])
    assert "crimsonish" in outs["emb"].info["parameters"] or "crimsonish" in json.dumps(outs["emb"].info)
