"""Prompts A1111's way, end to end, against a torch reference written here.

The reference follows AUTOMATIC1111's documented algorithm with independent
parts: the prompt is given as its weighted fragments (written out by hand,
as parse_prompt_attention gives them), tokenized by transformers'
CLIPTokenizer, cut into 75-token chunks (comma backtrack of 20, BREAK), the
textual-inversion vectors added to the torch text encoder as NEW TOKENS (as
diffusers' load_textual_inversion does, not through cpuflow's token-embedding
path), each chunk encoded by the torch CLIP model (clip skip N: hidden_states[-N]
+ final_layer_norm for SD; the raw penultimate layer for SDXL), weighted with
mean restoration, concatenated. Images: diffusers' pipeline given those
embeddings (prompt_embeds / negative_prompt_embeds). cpuflow must equal it to
>= 50 dB on both backends. Random tiny weights: numerics, not image quality.
"""
from __future__ import annotations

import copy
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers_images import psnr  # noqa: E402

from cpuflow import Pipeline  # noqa: E402
from cpuflow.errors import InvalidArgument, ModelError, UnsafeFileError  # noqa: E402
from cpuflow.pipelines.model import StageTimer  # noqa: E402
from cpuflow.pipelines.stages import encode_prompt  # noqa: E402
from cpuflow.prompt_encoding import PromptOptions  # noqa: E402

PSNR_MIN = 50.0
SIZE = 64
STEPS = 3
BACKENDS = ["openvino", "onnxruntime"]
EMB = "<emb>"      # marks where the embedding's word sits in a fragment list

# 22 words that the tiny tokenizer keeps whole (one token each)
W = ("a photo of an astronaut riding horse on mars the cat dog red car in painting landscape mountain "
     "city at night portrait").split()


def _words(n, start=0):
    return " ".join(W[(start + i) % len(W)] for i in range(n))


# A prompt of three chunks: weights, nesting, [ ], a comma near the end of the first
# chunk (A1111 moves the words after it to the next chunk), BREAK, an embedding word.
PROMPT = (f"{_words(30)} (red car:1.3) (({_words(20, 3)})) [{_words(8, 5)}] {_words(5, 9)}, "
          f"{_words(30, 2)} BREAK {_words(4)} myemb ((painting:1.2) [[landscape]])")
# ... and the same prompt as A1111's parse_prompt_attention gives it, written by hand
FRAGMENTS = [
    (_words(30) + " ", 1.0), ("red car", 1.3), (" ", 1.0), (_words(20, 3), 1.1 * 1.1), (" ", 1.0),
    (_words(8, 5), 1 / 1.1), (" " + _words(5, 9) + ", " + _words(30, 2), 1.0), ("BREAK", -1),
    (_words(4) + " ", 1.0), (EMB, 1.0), (" ", 1.0), ("painting", 1.2 * 1.1), (" ", 1.1),
    ("landscape", 1.1 / 1.1 / 1.1),
]
NEGATIVE = "blue sky, myemb (city at night:0.7)"       # a negative embedding too
NEG_FRAGMENTS = [("blue sky, ", 1.0), (EMB, 1.0), (" ", 1.0), ("city at night", 0.7)]


# --- the reference -------------------------------------------------------------------
def ref_chunks(frags, tok, emb_ids):
    """A1111's tokenize_line on hand-written fragments: (ids, weights) per chunk."""
    comma = tok.convert_tokens_to_ids(",</w>")
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    chunks, cur, curw = [], [], []

    def close():
        nonlocal cur, curw
        n = 75 - len(cur)
        chunks.append(([bos] + cur + [eos] + [pad] * n, [1.0] + curw + [1.0] * (n + 1)))
        cur, curw = [], []

    last_comma = -1
    for text, w in frags:
        if w == -1:
            close()
            last_comma = -1
            continue
        ids = list(emb_ids) if text == EMB else tok(text, add_special_tokens=False).input_ids
        if text == EMB and len(cur) + len(ids) > 75:
            close()
        for t in ids:
            if t == comma:
                last_comma = len(cur)
            elif len(cur) == 75 and last_comma != -1 and len(cur) - last_comma <= 20:
                keep = last_comma + 1
                moved, movedw = cur[keep:], curw[keep:]
                cur, curw = cur[:keep], curw[:keep]
                close()
                cur, curw, last_comma = moved, movedw, -1
            if len(cur) == 75:
                close()
                last_comma = -1
            cur.append(t)
            curw.append(w)
    if cur or not chunks:
        close()
    return chunks


def with_embedding(text_encoder, vectors):
    """A copy of the torch text encoder with the embedding's vectors as new tokens."""
    te = copy.deepcopy(text_encoder)
    n0 = te.get_input_embeddings().weight.shape[0]
    te.resize_token_embeddings(n0 + len(vectors))
    with torch.no_grad():
        te.get_input_embeddings().weight[n0:] = torch.as_tensor(vectors)
    return te, list(range(n0, n0 + len(vectors)))


@torch.no_grad()
def ref_encode(te, chunks, *, layer, normed, pooled=False):
    zs, pool = [], None
    for i, (ids, weights) in enumerate(chunks):
        out = te(input_ids=torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[layer]
        if normed:
            z = te.text_model.final_layer_norm(z) if hasattr(te, "text_model") else te.final_layer_norm(z)
        if pooled and i == 0:
            pool = out.text_embeds
        before = z.mean()
        z = z * torch.tensor(weights)[None, :, None]
        z = z * (before / z.mean())
        zs.append(z)
    return torch.cat(zs, dim=1), pool


def pad_chunks(a, b, empty):
    n = max(a.shape[1], b.shape[1])
    fill = lambda x: torch.cat([x] + [empty] * ((n - x.shape[1]) // 77), dim=1)  # noqa: E731
    return fill(a), fill(b)


# --- SD 1.x ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1(tiny_export, tmp_path_factory):
    t = tiny_export("sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(t.src, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tok = transformers.CLIPTokenizer.from_pretrained(t.src / "tokenizer")
    vectors = torch.Generator().manual_seed(5)
    vectors = (torch.randn(2, 128, generator=vectors) * 0.02).numpy()
    emb_file = tmp_path_factory.mktemp("emb") / "myemb.pt"          # an A1111 .pt (torch's zip pickle)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.tensor(vectors)},
                "name": "myemb", "step": 100}, emb_file)
    return t, pipe, tok, vectors, emb_file


def _sd1_reference(sd1, prompt_frags, clip_skip=1):
    t, pipe, tok, vectors, _ = sd1
    te, emb_ids = with_embedding(pipe.text_encoder, vectors)
    enc = lambda frags: ref_encode(te, ref_chunks(frags, tok, emb_ids), layer=-clip_skip, normed=True)[0]  # noqa
    return enc(prompt_frags), enc(NEG_FRAGMENTS), enc([("", 1.0)])


def _diffusers_clip_skip_shim(text_encoder):
    """diffusers' clip_skip reads ``text_encoder.text_model.final_layer_norm``; transformers 5
    flattened CLIPTextModel (no ``text_model``). Point the name at the model itself (not as a
    submodule) so diffusers' own clip-skip code runs unchanged."""
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


_PIPES: dict = {}


def _cpuflow(model, backend):
    key = (str(model), backend)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(model, backend=backend, precision="f32", threads=1, use_cache=False)
    return _PIPES[key]


def test_reference_agrees_with_a1111_rules():
    """The hand-written fragments are what the parser gives (the reference does not parse)."""
    from cpuflow.prompt_parser import parse_prompt
    got = [("BREAK", -1) if f.is_break else (f.text, f.weight) for f in parse_prompt(PROMPT).fragments]
    want = []
    for text, w in FRAGMENTS:   # the embedding word is plain text to the parser: merge it back
        text = "myemb" if text == EMB else text
        if want and want[-1][1] == w and w != -1:
            want[-1] = (want[-1][0] + text, w)
        else:
            want.append((text, w))
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd1_text_encoding_matches_reference(sd1, backend):
    t, _, _, _, emb_file = sd1
    ref, ref_neg, _ = _sd1_reference(sd1, FRAGMENTS)
    assert ref.shape[1] == 3 * 77
    pipe = _cpuflow(t.model, backend)
    opts = PromptOptions(embeddings=__import__("cpuflow.embeddings").embeddings.EmbeddingSet.load([str(emb_file)]))
    got = encode_prompt(pipe.model, PROMPT, StageTimer(), opts)
    assert got.embeddings.shape == tuple(ref.shape)
    assert psnr(got.embeddings, ref.numpy(), peak=float(np.abs(ref.numpy()).max())) >= PSNR_MIN
    neg = encode_prompt(pipe.model, NEGATIVE, StageTimer(), opts)
    assert psnr(neg.embeddings, ref_neg.numpy(), peak=float(np.abs(ref_neg.numpy()).max())) >= PSNR_MIN


@pytest.mark.parametrize("backend", BACKENDS)
def test_sd1_image_matches_diffusers_with_reference_embeddings(sd1, backend):
    t, pipe, _, _, emb_file = sd1
    ref, ref_neg, empty = _sd1_reference(sd1, FRAGMENTS)
    ref, ref_neg = pad_chunks(ref, ref_neg, empty)
    want = pipe(prompt_embeds=ref, negative_prompt_embeds=ref_neg, num_inference_steps=STEPS, guidance_scale=7.5,
                height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
    res = _cpuflow(t.model, backend).txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=3,
                                             embeddings=[str(emb_file)])
    assert psnr(np.asarray(res.images[0]), want) >= PSNR_MIN
    assert res.records[0]["embeddings"] == [str(emb_file)]


def _diffusers_image_clip_skip_1(pipe, prompt, negative, seed, **kw):
    """diffusers with clip_skip=1 on BOTH prompts (its pipeline applies clip_skip to the
    prompt only, A1111 to both): each text through diffusers' own encode_prompt."""
    _diffusers_clip_skip_shim(pipe.text_encoder)
    enc = lambda text: pipe.encode_prompt(text, "cpu", 1, False, clip_skip=1)[0]  # noqa: E731
    want = pipe(prompt_embeds=enc(prompt), negative_prompt_embeds=enc(negative), num_inference_steps=STEPS,
                height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                **kw).images[0]
    return np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_skip_2_is_diffusers_clip_skip_1(sd1, backend):
    """A1111 counts the last layer as 1; diffusers counts layers skipped: N = clip_skip + 1."""
    t, pipe, _, _, _ = sd1
    want = _diffusers_image_clip_skip_1(pipe, "a red car in the city", "blue", 4)
    cf = _cpuflow(t.model, backend)
    res = cf.txt2img("a red car in the city", negative_prompt="blue", steps=STEPS, seed=4, clip_skip=2)
    assert psnr(np.asarray(res.images[0]), want) >= PSNR_MIN
    plain = cf.txt2img("a red car in the city", negative_prompt="blue", steps=STEPS, seed=4)
    assert psnr(np.asarray(plain.images[0]), want) < PSNR_MIN       # clip skip changes the image
    assert res.records[0]["clip_skip"] == 2


def test_clip_skip_text_states_match_reference(sd1):
    ref, _, _ = _sd1_reference(sd1, FRAGMENTS, clip_skip=2)
    pipe = _cpuflow(sd1[0].model, "openvino")
    opts = PromptOptions(clip_skip=2, embeddings=__import__("cpuflow.embeddings").embeddings.EmbeddingSet.load(
        [str(sd1[4])]))
    got = encode_prompt(pipe.model, PROMPT, StageTimer(), opts)
    assert psnr(got.embeddings, ref.numpy(), peak=float(np.abs(ref.numpy()).max())) >= PSNR_MIN
    with pytest.raises(InvalidArgument, match="clip skip 4"):   # 2 layers + the embeddings: 3 states
        encode_prompt(pipe.model, "a cat", StageTimer(), PromptOptions(clip_skip=4))


# --- SDXL --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_export, tmp_path_factory):
    from safetensors.torch import save_file
    src, model = tiny_sdxl_export.src, tiny_sdxl_export.model
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(6)
    parts = {"clip_l": torch.randn(2, 32, generator=g) * 0.02, "clip_g": torch.randn(2, 64, generator=g) * 0.02}
    f = tmp_path_factory.mktemp("emb-xl") / "myemb.safetensors"
    save_file(parts, str(f))
    toks = [transformers.CLIPTokenizer.from_pretrained(src / d) for d in ("tokenizer", "tokenizer_2")]
    return model, pipe, toks, {k: v.numpy() for k, v in parts.items()}, f


def _sdxl_reference(sdxl, frags):
    _, pipe, toks, parts, _ = sdxl
    states, pooled = [], None
    for te, tok, part, pool in ((pipe.text_encoder, toks[0], "clip_l", False),
                                (pipe.text_encoder_2, toks[1], "clip_g", True)):
        te, emb_ids = with_embedding(te, parts[part])
        z, p = ref_encode(te, ref_chunks(frags, tok, emb_ids), layer=-2, normed=False, pooled=pool)
        states.append(z)
        pooled = p if pool else pooled
    return torch.cat(states, dim=-1), pooled


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_matches_reference_and_diffusers(sdxl, backend):
    model, pipe, _, _, emb_file = sdxl
    ref, pooled = _sdxl_reference(sdxl, FRAGMENTS)
    ref_neg, pooled_neg = _sdxl_reference(sdxl, NEG_FRAGMENTS)
    empty, _ = _sdxl_reference(sdxl, [("", 1.0)])
    cf = _cpuflow(model, backend)
    from cpuflow.embeddings import EmbeddingSet
    got = encode_prompt(cf.model, PROMPT, StageTimer(), PromptOptions(embeddings=EmbeddingSet.load([str(emb_file)])))
    assert got.embeddings.shape == tuple(ref.shape) == (1, 3 * 77, 96)
    assert psnr(got.embeddings, ref.numpy(), peak=float(np.abs(ref.numpy()).max())) >= PSNR_MIN
    assert psnr(got.pooled, pooled.numpy(), peak=float(np.abs(pooled.numpy()).max())) >= PSNR_MIN
    ref, ref_neg = pad_chunks(ref, ref_neg, empty)
    want = pipe(prompt_embeds=ref, pooled_prompt_embeds=pooled, negative_prompt_embeds=ref_neg,
                negative_pooled_prompt_embeds=pooled_neg, num_inference_steps=STEPS, guidance_scale=5.0,
                height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
    res = cf.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=3, embeddings=[str(emb_file)])
    assert psnr(np.asarray(res.images[0]), want) >= PSNR_MIN


def test_sdxl_clip_skip_2_is_diffusers_clip_skip_1(sdxl):
    model, pipe, _, _, _ = sdxl
    enc = lambda text: pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False,  # noqa: E731
                                          clip_skip=1)
    (pe, _, pp, _), (ne, _, npool, _) = enc("a red car"), enc("blue")
    want = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                negative_pooled_prompt_embeds=npool, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                generator=torch.Generator("cpu").manual_seed(2), output_type="np").images[0]
    want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
    res = _cpuflow(model, "openvino").txt2img("a red car", negative_prompt="blue", steps=STEPS, seed=2, clip_skip=2)
    assert psnr(np.asarray(res.images[0]), want) >= PSNR_MIN


# --- embeddings: files and bad input -------------------------------------------------
def test_embedding_formats_and_errors(sdxl, tmp_path):
    from safetensors.numpy import save_file

    from cpuflow.embeddings import EmbeddingSet, load_embedding
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"emb_params": v}, str(tmp_path / "a1111.safetensors"))
    torch.save({"<cat-toy>": torch.tensor(v[0])}, tmp_path / "learned_embeds.bin")   # diffusers
    save_file({"<dog>": v}, str(tmp_path / "learned_embeds.safetensors"))
    e = load_embedding(str(tmp_path / "a1111.safetensors"))
    assert e.name == "a1111" and np.array_equal(e.parts[""], v)
    e = load_embedding(str(tmp_path / "learned_embeds.bin"))
    assert e.name == "<cat-toy>" and np.array_equal(e.parts[""], v[:1])
    e = load_embedding(f"{tmp_path / 'learned_embeds.safetensors'}:mydog")
    assert e.name == "mydog" and e.n_vectors == 2
    torch.save({"string_to_param": {"*": torch.tensor(v).half()}}, tmp_path / "half.pt")
    assert np.array_equal(load_embedding(str(tmp_path / "half.pt")).parts[""], v)
    # made for another text encoder width: a clear error naming both widths
    s = EmbeddingSet([load_embedding(str(tmp_path / "a1111.safetensors"))])
    with pytest.raises(InvalidArgument, match="width 3.*width 128"):
        s.vectors_for("text_encoder", 128, sdxl=False)
    with pytest.raises(InvalidArgument, match="one text encoder.*SDXL"):
        s.vectors_for("text_encoder", 3, sdxl=True)
    xl = EmbeddingSet([load_embedding(str(sdxl[4]))])
    assert xl.vectors_for("text_encoder_2", 64, sdxl=True)["myemb"].shape == (2, 64)
    with pytest.raises(InvalidArgument, match="SDXL embedding"):
        xl.vectors_for("text_encoder", 32, sdxl=False)
    with pytest.raises(InvalidArgument, match="not found"):
        load_embedding(str(tmp_path / "missing.pt"))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/cpuflow-pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    from cpuflow.embeddings import load_embedding
    f = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": _Evil()}, f)
    assert zipfile.is_zipfile(f)
    with pytest.raises(UnsafeFileError, match="os.system|posix.system"):
        load_embedding(str(f))
    import pickle
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(UnsafeFileError, match="legacy"):
        load_embedding(str(legacy))


# --- old exports and limits ---------------------------------------------------------
def test_old_export_runs_plain_and_weighted_prompts_and_asks_to_reexport(tmp_path):
    """A schema-1 export (token-id text encoder, UNet of 77 tokens; here the shipped
    model turned back into one, tests/helpers_schema1.py) runs one-chunk prompts
    and says "re-export" for the rest."""
    from helpers_schema1 import schema_1_copy

    from cpuflow.pipelines.model import shipped_model_dir
    pipe = _cpuflow(schema_1_copy(shipped_model_dir(), tmp_path / "schema1"), "openvino")
    a = pipe.txt2img("a red circle on a blue background", steps=2, seed=1)
    b = pipe.txt2img("a (red:1.4) circle on a blue background", steps=2, seed=1)
    assert not a.warnings and psnr(np.asarray(a.images[0]), np.asarray(b.images[0])) < 60
    long = pipe.txt2img("a red circle on a blue background BREAK a square", steps=1, seed=1)
    assert any("only the first chunk" in w and "re-export" in w for w in long.warnings)
    with pytest.raises(ModelError, match="clip skip 2.*re-export"):
        pipe.txt2img("a red circle", steps=1, clip_skip=2)
    emb = tmp_path / "e.safetensors"
    from safetensors.numpy import save_file
    save_file({"emb_params": np.zeros((1, 32), np.float32)}, str(emb))
    with pytest.raises(ModelError, match="embeddings cannot be used.*re-export"):
        pipe.txt2img("a red circle", steps=1, embeddings=[str(emb)])


def test_prompt_limit_and_bad_weight_are_clear_errors(sd1):
    pipe = _cpuflow(sd1[0].model, "onnxruntime")
    with pytest.raises(InvalidArgument, match="more than 10 chunks"):
        pipe.txt2img(" BREAK ".join(["cat"] * 1000), steps=1)
    with pytest.raises(InvalidArgument, match="not a number"):
        pipe.txt2img("(cat:1.2.3)", steps=1)
    r = pipe.txt2img("(unclosed cat", steps=1)
    assert any("unclosed" in w for w in r.warnings)


def test_default_clip_skip_comes_from_the_manifest(sd1, tmp_path):
    """export --default-clip-skip N writes defaults.clip_skip; a request without clip_skip uses it."""
    import json
    import shutil

    from click.testing import CliRunner

    from export.cli import export_command
    r = CliRunner().invoke(export_command, ["--random-weights", "--arch", "sd15", str(tmp_path / "x"),
                                            "--default-clip-skip", "0"])
    assert r.exit_code != 0 and "clip_skip must be an integer from 1 to 12" in r.output   # before any load
    model = tmp_path / "m"
    shutil.copytree(sd1[0].model, model)
    raw = json.loads((model / "cpuflow.json").read_text())
    raw.setdefault("defaults", {})["clip_skip"] = 2
    (model / "cpuflow.json").write_text(json.dumps(raw))
    with Pipeline.load(model, backend="onnxruntime", precision="f32", use_cache=False) as mine:
        got = encode_prompt(mine.model, "a red car", StageTimer(), PromptOptions())
    want = encode_prompt(_cpuflow(sd1[0].model, "onnxruntime").model, "a red car", StageTimer(),
                         PromptOptions(clip_skip=2))
    assert np.array_equal(got.embeddings, want.embeddings)
