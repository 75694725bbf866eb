"""cpuflow/prompt_parser.py: A1111's prompt syntax and 75-token chunking (no torch, no model)."""
from __future__ import annotations

import pytest

from cpuflow.errors import InvalidArgument
from cpuflow.prompt_parser import (MAX_CHUNKS, TokenIds, chunk_prompt, empty_chunk, parse_prompt)


def pairs(text):
    return [("BREAK" if f.is_break else f.text, "B" if f.is_break else round(f.weight, 10))
            for f in parse_prompt(text).fragments]


# A1111's own doctest cases (modules/prompt_parser.py::parse_prompt_attention)
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("[unnecessary][parens]", [("unnecessaryparens", round(1 / 1.1, 10))]),
    ("a BREAK b", [("a", 1.0), ("BREAK", "B"), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_a1111_doctests(text, expected):
    assert pairs(text) == expected


def test_weights_nesting_and_spaces():
    assert pairs("((word))") == [("word", 1.21)]
    assert pairs("[[word]]") == [("word", round(1 / 1.21, 10))]
    assert pairs("(a phrase:0.8)") == [("a phrase", 0.8)]
    assert pairs("(word: 1.3 )") == [("word", 1.3)]          # spaces around the number (A1111 accepts them)
    assert pairs("((a:2))") == [("a", 2.2)]
    assert pairs("(a:-1)") == [("a", -1.0)]


def test_colon_inside_words_and_empty_weights():
    assert pairs("time: 12:30") == [("time: 12:30", 1.0)]
    # no number after ":" is not a weight: the ":" stays text and the brackets give 1.1, as A1111
    assert pairs("(word:)") == [("word:", 1.1)]
    assert pairs("(word:abc)") == [("word:abc", 1.1)]
    assert pairs("(:1.5)") == [("", 1.0)]                   # an empty weighted phrase leaves nothing
    with pytest.raises(InvalidArgument, match="is not a number"):
        parse_prompt("(word:1.2.3)")
    with pytest.raises(InvalidArgument, match="is not a number"):
        parse_prompt("(word:.)")


def test_unbalanced_brackets_are_literal_or_run_to_the_end_with_one_warning():
    p = parse_prompt("a) b] (c")
    assert [(f.text, round(f.weight, 6)) for f in p.fragments] == [("a) b] ", 1.0), ("c", 1.1)]
    assert len(p.warnings) == 2 and "unclosed" in p.warnings[0] and "literal" in p.warnings[1]
    assert parse_prompt("fine (prompt)").warnings == []
    # ":1.2)" with no "(" open is text too
    assert pairs("a:1.2) b") == [("a:1.2) b", 1.0)]


def test_escapes():
    assert pairs("\\\\") == [("\\", 1.0)]
    assert pairs("a \\(b\\) \\[c\\]") == [("a (b) [c]", 1.0)]
    assert pairs("c:\\x") == [("c:x", 1.0)]                 # a lone backslash is dropped, as A1111
    assert pairs("(\\(x\\):1.5)") == [("(x)", 1.5)]


def test_break_is_a_word_in_capitals_and_breaks_inside_brackets():
    assert pairs("aBREAKb") == [("aBREAKb", 1.0)]
    assert pairs("a break b") == [("a break b", 1.0)]
    # A1111 would weight the marker and then send the word "BREAK" to CLIP; cpuflow always breaks
    assert pairs("(a BREAK b)") == [("a", 1.1), ("BREAK", "B"), ("b", 1.1)]


# --- chunking ------------------------------------------------------------------
# A toy "tokenizer": one id per space-separated word, "," is its own token.
BOS, EOS, PAD, COMMA = 1000, 1001, 1002, 7
SPECIAL = TokenIds(bos=BOS, eos=EOS, pad=PAD, comma=COMMA, max_length=77)


def toy_encode(text):
    out = []
    for w in text.replace(",", " , ").split():
        out.append(COMMA if w == "," else 100 + len(w) if w != "x" else 11)
    return out


def chunks_of(text, **kw):
    return chunk_prompt(parse_prompt(text), toy_encode, SPECIAL, **kw)


def test_short_prompt_is_one_chunk_like_the_plain_tokenizer():
    (c,) = chunks_of("ab (abc:1.5)")
    assert c.ids == [BOS, 102, 103, EOS] + [PAD] * 73
    assert c.weights == [1.0, 1.0, 1.5] + [1.0] * 74
    assert chunks_of("")[0].ids == empty_chunk(SPECIAL).ids


def test_long_prompt_splits_at_75_tokens():
    cs = chunks_of(" ".join(["x"] * 160))
    assert [c.ids.count(11) for c in cs] == [75, 75, 10]
    assert all(len(c.ids) == 77 and c.ids[0] == BOS and c.ids[76] in (EOS, PAD) for c in cs)


def test_comma_near_the_end_moves_the_rest_to_the_next_chunk():
    words = ["x"] * 60 + [","] + ["x"] * 30      # comma at token 60: 15 tokens back from 75
    cs = chunks_of(" ".join(words))
    assert cs[0].ids[1:62] == [11] * 60 + [COMMA] and cs[0].ids[62] == EOS
    assert cs[1].ids[1:31] == [11] * 30
    far = ["x"] * 40 + [","] + ["x"] * 50          # comma 35 back: no backtrack
    cs = chunks_of(" ".join(far))
    assert cs[0].ids[1:76].count(11) == 74 and cs[1].ids[1:17] == [11] * 16


def test_break_starts_a_new_chunk_and_weights_follow_tokens():
    cs = chunks_of("(x x:1.5) BREAK [x]")
    assert len(cs) == 2
    assert cs[0].weights[1:3] == [1.5, 1.5] and cs[0].ids[3] == EOS
    assert cs[1].ids[1] == 11 and cs[1].weights[1] == pytest.approx(1 / 1.1)


def test_embedding_words_take_their_vectors_places():
    emb = ((105, 106), "mything", 3)               # name tokenizes to two ids, three vectors
    cs = chunks_of("x aaaaa bbbbbb x", embeddings=[emb])
    assert cs[0].ids[1] == 11 and cs[0].ids[5] == 11 and cs[0].embeddings == [(2, "mything")]
    # an embedding that does not fit in the rest of a chunk starts the next one
    cs = chunks_of(" ".join(["x"] * 74) + " aaaaa bbbbbb", embeddings=[emb])
    assert len(cs) == 2 and cs[1].embeddings == [(1, "mything")]


def test_chunk_limit_is_stated():
    chunks_of(" ".join(["x"] * (75 * MAX_CHUNKS)))
    with pytest.raises(InvalidArgument, match=f"more than {MAX_CHUNKS} chunks"):
        chunks_of(" ".join(["x"] * (75 * 1000)))
    with pytest.raises(InvalidArgument, match="chunks"):
        chunks_of(" BREAK ".join(["x"] * (MAX_CHUNKS + 1)))
