"""Prompts as AUTOMATIC1111 users write them: weights, BREAK, and 75-token chunks.

Pure Python (no numpy, no torch): this module turns a prompt into *chunks* of
token ids with one weight per token; ``cpuflow/prompt_encoding.py`` runs them
through the text encoder(s).

Syntax (A1111's ``modules/prompt_parser.py::parse_prompt_attention``):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by
  1.1; brackets nest and multiply: ``((text))`` = 1.21.
* ``(text:1.3)`` sets the multiplier to 1.3 (also nested: ``((a:2))`` = 2.2).
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; a backslash before
  anything else is dropped (as A1111).
* ``BREAK`` (upper case, a word of its own) ends the current chunk.
* An unclosed ``(`` or ``[`` applies to the end of the prompt; a ``)`` or ``]``
  with nothing to close is literal text (both as A1111; cpuflow says so in a
  warning). ``(word:abc)`` is not a weight: ``:abc`` stays text and the
  brackets give 1.1 (as A1111). A weight that looks like a number but is not
  one (``(word:1.2.3)``) is an error (A1111 raises there too).

One deliberate difference: A1111 turns ``BREAK`` into a pseudo-fragment of
weight -1 and a bracket around it multiplies that weight, after which it is no
longer recognised and the word "BREAK" reaches CLIP with a negative weight. Here
``BREAK`` always breaks, inside brackets too.

Chunking (A1111's ``sd_hijack_clip.py::tokenize_line``, with its default
``comma_padding_backtrack`` of 20): each fragment is tokenized on its own,
tokens fill chunks of ``max_length - 2`` (75 for CLIP's 77); when a chunk is
full and the last comma lies at most 20 tokens back, the tokens after that
comma move to the next chunk. Each chunk becomes ``bos + tokens + eos + pad...``
(77 ids) with weight 1 on the special tokens. A prompt has at most
:data:`MAX_CHUNKS` chunks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import InvalidArgument

ROUND = 1.1            # (text)
SQUARE = 1 / 1.1       # [text]
COMMA_BACKTRACK = 20   # A1111's opts.comma_padding_backtrack default
# At most this many chunks (10 x 75 = 750 tokens) per prompt: every chunk count
# is one more compiled UNet shape and a longer cross-attention; A1111 sets no
# limit, but a prompt of 1,000 chunks is a mistake, not a prompt.
MAX_CHUNKS = 10

_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
# ":" + optional spaces + a number-looking run + optional spaces + ")": the
# weight form A1111 accepts ( `:\s*([+-]?[.\d]+)\s*\)` ).
_WEIGHT_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}
_SPECIAL = set("\\()[]:")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; ``is_break`` marks a BREAK."""
    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Fragment("BREAK", 1.0, True)


@dataclass
class ParsedPrompt:
    fragments: list[Fragment]
    warnings: list[str] = field(default_factory=list)


def parse_prompt(text: str) -> ParsedPrompt:
    """Split ``text`` into weighted fragments (A1111's parse_prompt_attention).

    Adjacent fragments of equal weight are merged, as A1111 does, so the
    result is the same list A1111 gives (with BREAK as a marker)."""
    if not isinstance(text, str):
        raise InvalidArgument(f"prompt must be a string, got {type(text).__name__}")
    res: list[list] = []            # [text, weight, is_break]
    rounds: list[int] = []          # where each open "(" started in res
    squares: list[int] = []
    warnings: list[str] = []
    stray: list[str] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= factor

    def add_text(s: str) -> None:
        parts = _BREAK_RE.split(s)
        for i, part in enumerate(parts):
            if i:
                res.append(["BREAK", 1.0, True])
            res.append([part, 1.0, False])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            pair = text[i:i + 2]
            res.append([_ESCAPES.get(pair, ""), 1.0, False])
            i += 2 if pair in _ESCAPES else 1
        elif c == "(":
            rounds.append(len(res))
            i += 1
        elif c == "[":
            squares.append(len(res))
            i += 1
        elif c == ":":
            m = _WEIGHT_RE.match(text, i)
            if m and rounds:
                try:
                    w = float(m.group(1))
                except ValueError:
                    raise InvalidArgument(f"prompt weight {m.group(1)!r} is not a number "
                                          f"(write e.g. (word:1.2))") from None
                scale(rounds.pop(), w)
                i = m.end()
            elif m:   # no "(" to close: the whole ":1.2)" is text, as A1111
                stray.append(")")
                add_text(m.group(0))
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif c == ")":
            if rounds:
                scale(rounds.pop(), ROUND)
            else:
                stray.append(")")
                add_text(")")
            i += 1
        elif c == "]":
            if squares:
                scale(squares.pop(), SQUARE)
            else:
                stray.append("]")
                add_text("]")
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if rounds or squares:
        opened = "(" * len(rounds) + "[" * len(squares)
        warnings.append(f"prompt {_short(text)}: unclosed {opened!r} weights the rest of the prompt "
                        "(as AUTOMATIC1111 does); close it or escape it as \\( \\[")
    if stray:
        warnings.append(f"prompt {_short(text)}: {''.join(dict.fromkeys(stray))!r} with nothing to close "
                        "is taken as literal text (as AUTOMATIC1111 does)")
    if not res:
        res = [["", 1.0, False]]
    merged: list[list] = []
    for item in res:
        if merged and not item[2] and not merged[-1][2] and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(list(item))
    return ParsedPrompt([Fragment(t, w, b) for t, w, b in merged], warnings)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


# --- chunks ------------------------------------------------------------------
@dataclass
class Chunk:
    """One text-encoder window: ``ids`` and ``weights`` of length max_length
    (bos, up to max_length - 2 tokens, eos, padding); ``embeddings`` lists
    (position, name) where a textual-inversion embedding's vectors go
    (their ids are placeholders)."""
    ids: list[int]
    weights: list[float]
    embeddings: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenIds:
    """What chunking needs from a tokenizer."""
    bos: int
    eos: int
    pad: int
    comma: int | None
    max_length: int = 77


# (token ids of the embedding's name, its name, its number of vectors)
EmbeddingWord = tuple[tuple[int, ...], str, int]


def chunk_prompt(parsed: ParsedPrompt, encode: Callable[[str], Sequence[int]], special: TokenIds, *,
                 embeddings: Sequence[EmbeddingWord] = (), what: str = "prompt") -> list[Chunk]:
    """Cut a parsed prompt into chunks (A1111's tokenize_line; see the module doc).

    ``encode(text)`` gives a fragment's token ids without bos / eos or
    truncation. ``embeddings``: textual-inversion words; where a fragment's ids
    contain one's name ids, its vectors take their place (a chunk is closed
    first if they would not fit, as A1111)."""
    size = special.max_length - 2
    by_first: dict[int, list[EmbeddingWord]] = {}
    for emb in sorted(embeddings, key=lambda e: -len(e[0])):   # longest name first
        by_first.setdefault(emb[0][0], []).append(emb)
    chunks: list[Chunk] = []
    toks: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close() -> None:
        nonlocal toks, weights, fixes, last_comma
        if len(chunks) >= MAX_CHUNKS:
            raise InvalidArgument(f"{what} is too long: more than {MAX_CHUNKS} chunks of {size} tokens "
                                  f"({MAX_CHUNKS * size} tokens); shorten it")
        pad = size - len(toks)
        ids = [special.bos] + toks + [special.eos] + [special.pad] * pad
        chunks.append(Chunk(ids, [1.0] + weights + [1.0] * (pad + 1), [(p + 1, name) for p, name in fixes]))
        toks, weights, fixes, last_comma = [], [], [], -1

    for frag in parsed.fragments:
        if frag.is_break:
            close()
            continue
        ids = list(encode(frag.text))
        pos = 0
        while pos < len(ids):
            tok = ids[pos]
            if tok == special.comma:
                last_comma = len(toks)
            elif len(toks) == size and last_comma != -1 and len(toks) - last_comma <= COMMA_BACKTRACK:
                # the chunk is full and a comma is near its end: move what follows
                # the comma into the next chunk, so a phrase is not cut in two
                cut = last_comma + 1
                moved = (toks[cut:], weights[cut:], [(p - cut, nm) for p, nm in fixes if p >= cut])
                toks, weights, fixes = toks[:cut], weights[:cut], [f for f in fixes if f[0] < cut]
                close()
                toks, weights, fixes = list(moved[0]), list(moved[1]), moved[2]
            if len(toks) == size:
                close()
            emb = _embedding_at(ids, pos, by_first.get(tok, ()))
            if emb is None:
                toks.append(tok)
                weights.append(frag.weight)
                pos += 1
                continue
            name_ids, name, n_vec = emb
            if n_vec > size:
                raise InvalidArgument(f"embedding {name!r} has {n_vec} vectors; at most {size} fit in a chunk")
            if len(toks) + n_vec > size:
                close()
            fixes.append((len(toks), name))
            toks.extend([special.pad] * n_vec)
            weights.extend([frag.weight] * n_vec)
            pos += len(name_ids)
    if toks or not chunks:
        close()
    return chunks


def _embedding_at(ids: Sequence[int], pos: int, candidates) -> EmbeddingWord | None:
    for emb in candidates:
        n = len(emb[0])
        if tuple(ids[pos:pos + n]) == emb[0]:
            return emb
    return None


def empty_chunk(special: TokenIds) -> Chunk:
    """The chunk of an empty prompt: what a shorter prompt is padded with."""
    size = special.max_length - 2
    return Chunk([special.bos, special.eos] + [special.pad] * size, [1.0] * special.max_length)
