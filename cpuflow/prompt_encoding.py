"""Prompt -> text-encoder conditioning, as AUTOMATIC1111 computes it, without torch.

For each text encoder of the model (one for SD 1.x / 2.x, two for SDXL):

1. the prompt is parsed and cut into chunks of 77 ids (cpuflow/prompt_parser.py);
2. each chunk runs through the encoder on its own (batch 1: one compiled shape);
   the hidden state is the encoder's default layer, or ``clip_skip - 1`` layers
   before it (A1111's ``CLIP_stop_at_last_layers``: 1 = the default; for SD 1.x
   ``hidden_states[-N]`` followed by the final layer norm, exactly A1111's
   ``encode_with_transformers``);
3. the weights (A1111's "Original" emphasis, ``sd_emphasis.EmphasisOriginal``):
   ``z *= weight`` per token, then ``z *= mean_before / mean_after`` over the
   whole chunk, so weighting changes the direction of tokens, not the overall
   scale of the conditioning;
4. the chunks are concatenated along the sequence: (1, 77 * k, width).

SDXL: the two encoders' states are concatenated on the channels as diffusers
does; the pooled ``text_embeds`` comes from text_encoder_2 on the FIRST chunk,
unweighted (A1111: ``zs[0].pooled``).

Textual-inversion vectors need an encoder that takes token embeddings
(``inputs_embeds``, manifest schema 2): the ids are looked up in the exported
token-embedding table and the embedding's vectors replace the placeholder rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidArgument, ModelError
from .image import check_finite
from .prompt_parser import Chunk, EmbeddingWord, TokenIds, chunk_prompt, empty_chunk, parse_prompt
from .tokenizer import ClipTokenizer

REEXPORT = "re-export the model with this cpuflow (`cpuflow export`)"


@dataclass(frozen=True)
class Encoder:
    """One text encoder as the prompt stage sees it."""
    name: str                     # component name: text_encoder, text_encoder_2
    tokenizer: ClipTokenizer
    max_length: int
    default_output: str           # the output used by exports without hidden_states (schema 1)

    def token_ids(self) -> TokenIds:
        t = self.tokenizer
        return TokenIds(bos=t.bos_id, eos=t.eos_id, pad=t.pad_id, comma=t.token_id(",</w>"),
                        max_length=self.max_length)


@dataclass
class EncodedPrompt:
    """The encoded prompt: ``embeddings`` (1, 77 * chunks, width) float32;
    ``pooled`` (1, projection) for SDXL, else None."""
    embeddings: np.ndarray
    pooled: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    is_zeros: bool = False        # SDXL's "no negative prompt": zeros, padded with zeros

    def zeros(self) -> "EncodedPrompt":
        return EncodedPrompt(np.zeros_like(self.embeddings),
                            None if self.pooled is None else np.zeros_like(self.pooled), [], True)


@dataclass(frozen=True)
class PromptOptions:
    """What the user chose about prompt encoding: ``clip_skip`` (None: the
    model's default, 1 = its own layer) and textual-inversion ``embeddings``
    (cpuflow/embeddings.py: name -> vectors per encoder width)."""
    clip_skip: int | None = None
    embeddings: Any = None        # cpuflow.embeddings.EmbeddingSet | None


# --- capabilities of an export ---------------------------------------------------
def takes_token_embeddings(component) -> bool:
    return any(s.name == "inputs_embeds" for s in component.inputs)


def hidden_states_output(component):
    for s in component.outputs:
        if s.name == "hidden_states":
            return s
    return None


def default_clip_skip(manifest) -> int:
    """The model's own clip skip (manifest ``defaults.clip_skip``; 1 when unset)."""
    v = (manifest.raw.get("defaults") or {}).get("clip_skip", 1)
    return int(v)


def check_clip_skip(value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
        raise InvalidArgument(f"clip_skip must be an integer from 1 to 12 (1 = the text encoder's own "
                              f"last layer, A1111's meaning), got {value!r}")


# --- running one chunk -------------------------------------------------------------
def _token_table(path: Path) -> np.ndarray:
    st = path.stat()   # a re-export in place is a new file: a new key
    return _load_table(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _load_table(path: str, _mtime_ns: int, _size: int) -> np.ndarray:
    # memory-mapped: only the rows a prompt uses are read
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _layer_index(model, enc: Encoder, clip_skip: int) -> int:
    comp = model.manifest.components[enc.name]
    spec = hidden_states_output(comp)
    if spec is None:
        if clip_skip != 1:
            raise ModelError(f"{model.manifest.root}: this export's {enc.name} gives only its last layer, so "
                             f"clip skip {clip_skip} cannot be applied", hint=REEXPORT)
        return 0
    n_layers = int(spec.shape[1])
    default = int(comp.config.get("default_layer", -1))
    idx = default - (clip_skip - 1)
    if idx < -n_layers:
        raise InvalidArgument(f"clip skip {clip_skip} is more than {enc.name}'s {n_layers - 1} layers allow")
    return idx


def _run_chunk(model, enc: Encoder, chunk: Chunk, layer: int, vectors: Mapping[str, np.ndarray],
               timer) -> tuple[np.ndarray, np.ndarray | None]:
    comp = model.manifest.components[enc.name]
    ids = np.asarray([chunk.ids], dtype=np.int64)
    if takes_token_embeddings(comp):
        table = _token_table(Path(model.manifest.path(comp.config["token_embeddings"]["path"])))
        emb = np.asarray(table[ids[0]], dtype=np.float32)
        for pos, name in chunk.embeddings:
            v = vectors[name]
            emb[pos:pos + len(v)] = v[:len(emb) - pos]
        feeds = {"inputs_embeds": emb[None]}
        if any(s.name == "input_ids" for s in comp.inputs):
            feeds["input_ids"] = ids       # where the pooled output is read (the first eos)
    else:   # schema 1: token ids (encode_text refused embeddings for it)
        feeds = {"input_ids": ids}
    t0 = time.perf_counter()
    out = model.run(enc.name, {"batch": 1}, feeds)
    if timer is not None:
        timer.add("text_encoder", time.perf_counter() - t0)
    if hidden_states_output(comp) is not None:
        z = out["hidden_states"][:, layer]
    else:
        z = out[enc.default_output]
    check_finite(f"{enc.name} output", z)
    return np.asarray(z, dtype=np.float32), out.get("text_embeds")


def apply_weights(z: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """A1111's emphasis with mean restoration (sd_emphasis.EmphasisOriginal):
    multiply each token's state by its weight, then rescale the chunk so its
    mean over all values equals the unweighted mean. Unweighted chunks are
    returned as they are (bit for bit)."""
    w = np.asarray(weights, dtype=np.float32)
    if np.all(w == 1.0):
        return z
    before = z.mean(dtype=np.float64)
    zw = z * w[None, :, None]
    after = zw.mean(dtype=np.float64)
    return (zw * np.float32(before / after)).astype(np.float32)


# --- the prompt ----------------------------------------------------------------
def chunks_for(enc: Encoder, text: str, options: PromptOptions, warnings: list[str], what: str) -> list[Chunk]:
    parsed = parse_prompt(text)
    warnings.extend(parsed.warnings)
    words: list[EmbeddingWord] = []
    if options.embeddings is not None:
        words = options.embeddings.words(enc.tokenizer.encode)
    return chunk_prompt(parsed, enc.tokenizer.encode, enc.token_ids(), embeddings=words, what=what)


def encode_text(model, encoders: Sequence[Encoder], text: str, options: PromptOptions, timer=None, *,
                what: str = "prompt") -> EncodedPrompt:
    """Encode ``text`` with every encoder (SDXL: both) into one EncodedPrompt."""
    clip_skip = options.clip_skip if options.clip_skip is not None else default_clip_skip(model.manifest)
    check_clip_skip(clip_skip)
    if options.embeddings is not None:
        for enc in encoders:
            if not takes_token_embeddings(model.manifest.components[enc.name]):
                raise ModelError(f"{model.manifest.root}: this export's {enc.name} takes token ids only, so "
                                 "textual-inversion embeddings cannot be used", hint=REEXPORT)
    warnings: list[str] = []
    per_encoder = [chunks_for(enc, text, options, warnings if i == 0 else [], what)
                   for i, enc in enumerate(encoders)]
    n = max(len(c) for c in per_encoder)
    states, pooled = [], None
    for enc, chunks in zip(encoders, per_encoder):
        chunks = chunks + [empty_chunk(enc.token_ids())] * (n - len(chunks))
        layer = _layer_index(model, enc, clip_skip)
        vectors = {} if options.embeddings is None else options.embeddings.vectors_for(
            enc.name, int(model.manifest.components[enc.name].config.get("hidden_size", 0)),
            sdxl=len(encoders) > 1)
        zs = []
        for i, chunk in enumerate(chunks):
            z, p = _run_chunk(model, enc, chunk, layer, vectors, timer)
            zs.append(apply_weights(z, chunk.weights))
            if i == 0 and p is not None:
                pooled = np.asarray(p, dtype=np.float32)
        states.append(np.concatenate(zs, axis=1))
    emb = np.concatenate(states, axis=-1) if len(states) > 1 else states[0]
    return EncodedPrompt(np.ascontiguousarray(emb, dtype=np.float32), pooled, list(dict.fromkeys(warnings)))


def pad_to_same_length(a: EncodedPrompt, b: EncodedPrompt, empty: EncodedPrompt) -> tuple[EncodedPrompt, EncodedPrompt]:
    """Prompt and negative prompt padded to the same number of chunks with the
    encoding of the empty prompt (A1111's ``pad_cond``), so both fit one UNet batch."""
    n = max(a.embeddings.shape[1], b.embeddings.shape[1])

    def pad(c: EncodedPrompt) -> EncodedPrompt:
        missing = (n - c.embeddings.shape[1]) // empty.embeddings.shape[1]
        if missing <= 0:
            return c
        filler = np.zeros_like(empty.embeddings) if c.is_zeros else empty.embeddings
        return EncodedPrompt(np.concatenate([c.embeddings] + [filler] * missing, axis=1), c.pooled, c.warnings,
                            c.is_zeros)
    return pad(a), pad(b)


def unet_context_length(model) -> int | None:
    """The UNet's fixed text length (old exports: 77), or None when it takes any multiple."""
    d = model.manifest.components["unet"].input("encoder_hidden_states").shape[1]
    return d if isinstance(d, int) else None


def fit_to_unet(model, cond: EncodedPrompt, warnings: list[str], what: str) -> EncodedPrompt:
    """An export whose UNet takes a fixed 77 tokens (before schema 2) gets the
    first chunk only, with a warning that says how to get the rest."""
    fixed = unet_context_length(model)
    if fixed is None or cond.embeddings.shape[1] <= fixed:
        return cond
    msg = (f"{what} needs {cond.embeddings.shape[1] // fixed} chunks of {fixed - 2} tokens but this export's UNet "
           f"takes one: only the first chunk is used (re-export the model with this cpuflow for long prompts)")
    if msg not in warnings:
        warnings.append(msg)
    return EncodedPrompt(cond.embeddings[:, :fixed], cond.pooled, cond.warnings, cond.is_zeros)


def text_length_dims(model, cond_len: int) -> dict[str, int]:
    """The UNet dims entry for the text length (one compiled shape per chunk count)."""
    d = model.manifest.components["unet"].input("encoder_hidden_states").shape[1]
    return {d: cond_len} if isinstance(d, str) else {}


def encoders_of(model) -> list[Encoder]:
    """The model's text encoders with their tokenizers (SDXL: two)."""
    encs = [Encoder("text_encoder", model.tokenizer, model.max_length,
                    "penultimate_hidden_states" if model.manifest.family == "sdxl" else "last_hidden_state")]
    if model.manifest.family == "sdxl":
        tok2, max2 = _tokenizer_2(model)
        encs.append(Encoder("text_encoder_2", tok2, max2, "penultimate_hidden_states"))
    return encs


def _tokenizer_2(model) -> tuple[ClipTokenizer, int]:
    cached = getattr(model, "_tokenizer_2", None)
    if cached is None:
        info = model.manifest.raw.get("tokenizer_2")
        if not isinstance(info, dict) or "path" not in info:
            raise ModelError(f"SDXL model folder {model.manifest.root} has no tokenizer_2", hint=REEXPORT)
        tok = ClipTokenizer.from_dir(Path(model.manifest.path(info["path"])))
        cached = (tok, int(info.get("max_length", tok.max_length)))
        model._tokenizer_2 = cached
    return cached
