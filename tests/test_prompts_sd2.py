"""Prompts A1111's way on an SD 2.x model (issue #14), against the torch reference
of tests/test_prompts.py.

The tiny "sd2-v" model (tests/helpers_tiny.py) has SD 2.x's shape, scaled down: an
OpenCLIP-style text encoder (hidden_act gelu, pad token "!", a width of 192 for
SD 2's 1024), a UNet with use_linear_projection, attention_head_dim a list
([1, 2]) and cross-attention of the text width, v-prediction, DDIM. SD 2.x
checkpoints hold the text encoder up to OpenCLIP's penultimate layer (that is the
layer SD 2 was trained on), so clip skip 1 is that layer + final layer norm and
clip skip 2 one layer earlier, as A1111 does for SD 2.

The reference: the prompt as hand-written weighted fragments, chunked and encoded
by the torch text encoder with the embedding added as new tokens, weighted with
mean restoration (tests/test_prompts.py: ref_chunks, ref_encode); images from
diffusers' StableDiffusionPipeline given those embeddings. >= 50 dB on both backends.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers_images import psnr  # noqa: E402
from test_prompts import (FRAGMENTS, NEG_FRAGMENTS, NEGATIVE, PROMPT, PSNR_MIN, SIZE, STEPS,  # noqa: E402
                          pad_chunks, ref_chunks, ref_encode, with_embedding)

from cpuflow import Pipeline  # noqa: E402
from cpuflow.embeddings import EmbeddingSet  # noqa: E402
from cpuflow.pipelines.model import StageTimer  # noqa: E402
from cpuflow.pipelines.stages import encode_prompt  # noqa: E402
from cpuflow.prompt_encoding import PromptOptions  # noqa: E402

BACKENDS = ["openvino", "onnxruntime"]
_PIPES: dict = {}


def _safetensors(path, tensors) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))


@pytest.fixture(scope="module")
def sd2(tiny_export, tmp_path_factory):
    t = tiny_export("sd2-v")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(t.src, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tok = transformers.CLIPTokenizer.from_pretrained(t.src / "tokenizer")
    width = pipe.text_encoder.config.hidden_size
    vectors = (torch.randn(2, width, generator=torch.Generator().manual_seed(6)) * 0.02).numpy()
    emb_file = tmp_path_factory.mktemp("emb2") / "myemb.safetensors"      # A1111 / civitai safetensors
    _safetensors(emb_file, {"emb_params": vectors})
    yield t, pipe, tok, vectors, emb_file
    for key in [k for k in _PIPES if k[0] == str(t.model)]:
        _PIPES.pop(key).close()


def _cpuflow(model, backend):
    key = (str(model), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(model, backend=backend, precision="f32", threads=2, use_cache=False)
    return _PIPES[key]


def test_the_tiny_model_has_sd2s_shape(sd2):
    t, pipe = sd2[0], sd2[1]
    m = _cpuflow(t.model, "onnxruntime").manifest
    assert (m.family, m.prediction_type) == ("sd2", "v_prediction")
    te, unet = pipe.text_encoder.config, pipe.unet.config
    assert te.hidden_act == "gelu" and sd2[2].pad_token == "!"
    assert unet.use_linear_projection and isinstance(unet.attention_head_dim, (list, tuple))
    assert unet.cross_attention_dim == te.hidden_size == 192
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def _reference(sd2, clip_skip):
    _, pipe, tok, vectors, _ = sd2
    te, emb_ids = with_embedding(pipe.text_encoder, vectors)
    enc = lambda frags: ref_encode(te, ref_chunks(frags, tok, emb_ids), layer=-clip_skip, normed=True)[0]  # noqa
    return enc(FRAGMENTS), enc(NEG_FRAGMENTS), enc([("", 1.0)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd2_text_states_match_reference(sd2, backend):
    """3 chunks (weights, nesting, BREAK, a comma moved to the next chunk), an embedding,
    clip skip 2, and the negative prompt with the embedding: cpuflow's conditioning."""
    t, _, _, _, emb_file = sd2
    opts = PromptOptions(clip_skip=2, embeddings=EmbeddingSet.load([str(emb_file)]))
    ref, ref_neg, _ = _reference(sd2, clip_skip=2)
    model = _cpuflow(t.model, backend).model
    got = encode_prompt(model, PROMPT, StageTimer(), opts)
    assert got.embeddings.shape == tuple(ref.shape) == (1, 3 * 77, 192)
    assert psnr(got.embeddings, ref.numpy(), peak=float(np.abs(ref.numpy()).max())) >= PSNR_MIN
    neg = encode_prompt(model, NEGATIVE, StageTimer(), opts)
    assert psnr(neg.embeddings, ref_neg.numpy(), peak=float(np.abs(ref_neg.numpy()).max())) >= PSNR_MIN
    plain = encode_prompt(model, PROMPT, StageTimer(), PromptOptions(embeddings=opts.embeddings))
    assert psnr(plain.embeddings, ref.numpy(), peak=float(np.abs(ref.numpy()).max())) < PSNR_MIN  # skip matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd2_v_image_matches_diffusers(sd2, backend):
    """The whole txt2img (v-prediction, the model's DDIM) with that prompt, negative prompt,
    embedding and clip skip 2 equals diffusers' pipeline given the reference embeddings."""
    t, pipe, _, _, emb_file = sd2
    ref, ref_neg, empty = _reference(sd2, clip_skip=2)
    ref, ref_neg = pad_chunks(ref, ref_neg, empty)
    want = pipe(prompt_embeds=ref, negative_prompt_embeds=ref_neg, num_inference_steps=STEPS, guidance_scale=7.5,
                height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
    res = _cpuflow(t.model, backend).txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=3, guidance=7.5,
                                             clip_skip=2, embeddings=[str(emb_file)], watermark=False)
    assert res.records[0]["sampler"] == "ddim"
    assert psnr(np.asarray(res.images[0]), want) >= PSNR_MIN
    assert res.records[0]["clip_skip"] == 2 and res.records[0]["embeddings"] == [str(emb_file)]
