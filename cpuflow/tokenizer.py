"""CLIP tokenizer for the runtime: Hugging Face ``tokenizers`` (a Rust wheel, no torch).

Stable Diffusion turns a prompt into 77 token ids with ``transformers``'
``CLIPTokenizer(prompt, padding="max_length", max_length=77, truncation=True)``.
In transformers 5 that class is a thin wrapper around a ``tokenizers.Tokenizer``,
so the runtime uses the same Rust object without transformers:

* a folder with ``tokenizer.json`` (every folder ``cpuflow export`` writes) is
  loaded as it is;
* an older folder with only ``vocab.json`` + ``merges.txt`` (the layout of the
  SD repositories on the Hub) gets the tokenizer that transformers'
  ``CLIPTokenizer.__init__`` builds from those files (:func:`build_clip_tokenizer`),
  with the special tokens registered as transformers' loading rules register
  them (``_added_tokens``; in SD 2.x every ``!`` of a prompt becomes the pad id 0,
  exactly as in diffusers). The export writes that same tokenizer as
  ``tokenizer.json`` (:func:`write_tokenizer_json`).

``tests/test_tokenizer.py`` compares both paths with transformers' ids on 529
awkward prompts for the SD 1.x and 2.x vocabularies.

What this module adds: bos + ids + eos + padding to ``max_length`` with the
truncation reported (how many tokens were kept, the dropped text), lone UTF-16
surrogates replaced by U+FFFD (``tokenizers`` refuses them with a TypeError,
so nothing about a ``str`` makes :meth:`ClipTokenizer.encode` raise), and a
:class:`ModelError` naming the missing or damaged file.
"""
from __future__ import annotations

import gzip
import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from cpuflow.errors import InvalidArgument, ModelError

__all__ = ["ClipTokenizer", "TokenizedPrompt", "build_clip_tokenizer", "write_tokenizer_json",
           "write_clip_tokenizer_files", "bytes_to_unicode"]

_REMEDY = "re-export the model"
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_EOW = "</w>"
_DEFAULT_MAX_LENGTH = 77  # CLIP's context length, when the config does not say
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                     "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# transformers' CLIPTokenizer pre-tokenizer pattern (contractions, letter runs,
# single digits, runs of other non-space characters).
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SURROGATE = re.compile("[\ud800-\udfff]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters
    (the alphabet of a byte-level BPE vocabulary, in vocabulary order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _scrub_surrogates(text: str) -> str:
    if _SURROGATE.search(text) is None:
        return text
    # Pair up valid surrogate pairs, replace the lone ones with U+FFFD.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


@dataclass(frozen=True, eq=False)
class TokenizedPrompt:
    """A prompt ready for the text encoder.

    ``ids``: int64 array of shape ``(max_length,)``: bos, kept ids, eos, padding.
    ``n_tokens``: how many content tokens were kept. ``truncated``: whether any
    were cut; ``dropped_text`` is their decoded text ("" when none were).
    """

    ids: np.ndarray
    n_tokens: int
    truncated: bool
    dropped_text: str


class ClipTokenizer:
    """A CLIP tokenizer folder: the ``tokenizers`` object plus the framing ids.

    Attributes: ``max_length`` (``model_max_length`` of the config, 77 if
    absent), ``bos_id``, ``eos_id``, ``pad_id`` (the pad token comes from the
    files: ``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x).
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int, eos_id: int, pad_id: int,
                 max_length: int = _DEFAULT_MAX_LENGTH):
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.max_length = int(max_length)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ClipTokenizer":
        """Load ``tokenizer.json`` if the folder has one, else build the tokenizer
        from ``vocab.json`` + ``merges.txt``; ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (both optional) name the special tokens and
        the length. Raises :class:`ModelError` naming the missing or damaged file."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"tokenizer folder not found: {folder}", hint=_REMEDY)
        specials, decoder, max_length = _read_configs(folder)
        data = _read_bytes(folder / "tokenizer.json", required=False)
        if data is not None:
            try:
                tok = Tokenizer.from_str(data.decode("utf-8-sig"))
            except Exception as e:  # tokenizers raises a bare Exception for a bad file
                raise ModelError(f"{folder / 'tokenizer.json'} is not a tokenizers file: {e}", hint=_REMEDY) from None
            # A file saved after transformers padded / truncated carries those
            # settings; the framing below does both, with truncation reported.
            tok.no_truncation()
            tok.no_padding()
        else:
            vocab, merges = _read_vocab(folder / "vocab.json"), _read_merges(folder / "merges.txt")
            tok = build_clip_tokenizer(vocab, merges, specials=specials, added_tokens_decoder=decoder,
                                       source=str(folder))
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            content = _token_content(specials[key])
            ids[key] = tok.token_to_id(content)
            if ids[key] is None:
                raise ModelError(f"{folder}: {key} {content!r} is not in the vocabulary", hint=_REMEDY)
        return cls(tok, bos_id=ids["bos_token"], eos_id=ids["eos_token"], pad_id=ids["pad_token"],
                   max_length=max_length)

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without bos/eos and without truncation (what a
        prompt chunker needs). Never raises for a ``str``."""
        if not isinstance(text, str):
            raise InvalidArgument(f"prompt must be a string, got {type(text).__name__}")
        return self._tok.encode(_scrub_surrogates(text), add_special_tokens=False).ids

    def __call__(self, text: str, max_length: int | None = None) -> TokenizedPrompt:
        """bos + ids + eos, truncated and padded to ``max_length`` (default: the config's)."""
        try:
            length = self.max_length if max_length is None else operator.index(max_length)
        except TypeError:
            length = -1
        if not 2 <= length <= 1_000_000:
            raise InvalidArgument(f"max_length must be an integer in [2, 1000000], got {max_length!r}")
        ids = self.encode(text)
        keep, dropped = ids[: length - 2], ids[length - 2:]
        out = np.full(length, self.pad_id, dtype=np.int64)
        out[0] = self.bos_id
        out[1 : 1 + len(keep)] = keep
        out[1 + len(keep)] = self.eos_id
        out.flags.writeable = False
        return TokenizedPrompt(out, len(keep), bool(dropped), self.decode(dropped) if dropped else "")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` as transformers' CLIPTokenizer ``decode`` gives it:
        special tokens kept, ``</w>`` read as a space, ends stripped."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        return text.replace(_EOW, " ").strip()


# --------------------------------------------------------------------- building
def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], *,
                         specials: dict | None = None, added_tokens_decoder: dict | None = None,
                         source: str = "tokenizer") -> Tokenizer:
    """The ``tokenizers.Tokenizer`` that transformers' ``CLIPTokenizer`` builds
    from ``vocab.json`` / ``merges.txt`` (transformers 5,
    ``models/clip/tokenization_clip.py``): byte-level BPE with ``</w>`` word
    ends, NFC + whitespace runs to one space + lower case, the CLIP split
    pattern, then GPT-2's byte-level step.

    ``specials`` (``bos_token`` ... as in the configs; CLIP's defaults fill the
    gaps) and ``added_tokens_decoder`` (from ``tokenizer_config.json``) give the
    added tokens, see :func:`_added_tokens`."""
    specials = {**_DEFAULT_SPECIALS, **(specials or {})}
    vocab = dict(vocab)
    added = _added_tokens(vocab, specials, added_tokens_decoder)
    for content, (idx, _) in added.items():
        vocab.setdefault(content, idx)
    unk = _token_content(specials.get("unk_token"))
    try:
        model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=_EOW,
                    fuse_unk=False, unk_token=unk if unk in vocab else None)
    except Exception as e:  # a merge naming a symbol the vocabulary lacks
        raise ModelError(f"{source}/merges.txt does not fit vocab.json: {e}", hint=_REMEDY) from None
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([token for _, token in sorted(added.values(), key=lambda v: v[0])])
    bos, eos = _token_content(specials["bos_token"]), _token_content(specials["eos_token"])
    if bos in vocab and eos in vocab:  # framing for other users of the file (cpuflow frames itself)
        tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                          trim_offsets=False, add_prefix_space=False)
    return tok


def _added_tokens(vocab: dict[str, int], specials: dict, decoder: dict | None) -> dict[str, tuple[int, AddedToken]]:
    """transformers 5's choice of added tokens: content -> (id, AddedToken).

    Tokens of ``added_tokens_decoder`` keep their flags (``normalized`` defaults
    to "not special"); named special tokens not listed there are added in
    transformers' order (bos, eos, unk, sep, pad, cls, mask), a later one
    replacing an earlier one with the same text, plain strings being
    non-normalized. A special token missing from the vocabulary is skipped
    (the caller refuses a missing bos / eos / pad)."""
    added: dict[str, tuple[int, AddedToken]] = {}
    for idx, entry in sorted((decoder or {}).items(), key=lambda kv: int(kv[0])):
        content = entry["content"]
        if content:
            special = bool(entry.get("special", False))
            added[content] = (vocab.get(content, int(idx)), AddedToken(
                content, single_word=bool(entry.get("single_word", False)), lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)), normalized=bool(entry.get("normalized", not special)),
                special=special))
    registered = set(added)
    for key in _SPECIAL_KEYS:
        value = specials.get(key)
        content = _token_content(value)
        if not content or content in registered or content not in vocab:
            continue
        flags = value if isinstance(value, dict) else {}
        added[content] = (vocab[content], AddedToken(
            content, single_word=bool(flags.get("single_word", False)), lstrip=bool(flags.get("lstrip", False)),
            rstrip=bool(flags.get("rstrip", False)), normalized=bool(flags.get("normalized", False)), special=True))
    return added


def write_tokenizer_json(folder: str | os.PathLike) -> Path:
    """Write ``folder/tokenizer.json`` for a folder that has only ``vocab.json``
    + ``merges.txt`` (+ configs): the tokenizer :meth:`ClipTokenizer.from_dir`
    builds for it, so that the file and the old folder give the same ids.
    An existing ``tokenizer.json`` is kept. Returns its path."""
    folder = Path(folder)
    target = folder / "tokenizer.json"
    if target.is_file():
        return target
    specials, decoder, _ = _read_configs(folder)
    tok = build_clip_tokenizer(_read_vocab(folder / "vocab.json"), _read_merges(folder / "merges.txt"),
                               specials=specials, added_tokens_decoder=decoder, source=str(folder))
    tmp = folder / "tokenizer.json.tmp"
    tok.save(str(tmp), pretty=True)
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------- reading
def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_configs(folder: Path) -> tuple[dict, dict | None, int]:
    """(special tokens by key, added_tokens_decoder, max_length) from the two
    optional JSON configs, with transformers' precedence."""
    config = _read_json(folder / "tokenizer_config.json") or {}
    smap = _read_json(folder / "special_tokens_map.json") or {}
    if not isinstance(config, dict) or not isinstance(smap, dict):
        bad = "tokenizer_config.json" if not isinstance(config, dict) else "special_tokens_map.json"
        raise ModelError(f"{folder / bad} is not a JSON object", hint=_REMEDY)
    # transformers: with `added_tokens_decoder` in the config, special tokens
    # come from the config alone; otherwise special_tokens_map.json overrides it.
    specials = {k: config[k] for k in _SPECIAL_KEYS if config.get(k) is not None}
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        specials.update({k: smap[k] for k in _SPECIAL_KEYS if smap.get(k) is not None})
    for key, value in specials.items():
        if not isinstance(value, (str, dict)) or not isinstance(_token_content(value), str):
            raise ModelError(f"{folder}: bad {key} entry {value!r} in the tokenizer config", hint=_REMEDY)
    if decoder is not None and not (
        isinstance(decoder, dict) and all(str(k).isdigit() and isinstance(v, dict)
                                          and isinstance(v.get("content"), str) for k, v in decoder.items())
    ):
        raise ModelError(f"{folder / 'tokenizer_config.json'}: bad added_tokens_decoder", hint=_REMEDY)
    max_length = config.get("model_max_length", _DEFAULT_MAX_LENGTH)
    if type(max_length) is not int or not 2 <= max_length <= 1_000_000:
        max_length = _DEFAULT_MAX_LENGTH  # transformers' "unset" is a huge int
    # `do_lower_case` is not consulted: transformers' CLIP normaliser always
    # lower-cases, whatever the config says.
    return {**_DEFAULT_SPECIALS, **specials}, decoder, max_length


def _read_bytes(path: Path, *, required: bool) -> bytes | None:
    if not path.is_file():
        if not required:
            return None
        raise ModelError(f"tokenizer file missing: {path}", hint=_REMEDY)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read tokenizer file {path}: {e.strerror or e}", hint=_REMEDY) from None
    if data.startswith(_LFS_MAGIC):
        raise ModelError(
            f"{path} is a Git LFS pointer, not the file itself",
            hint="run `git lfs pull` in the model repository, or re-export the model",
        )
    return data


def _read_json(path: Path, *, required: bool = False):
    data = _read_bytes(path, required=required)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON: {e}", hint=_REMEDY) from None


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path, required=True)
    if not isinstance(vocab, dict) or not vocab or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in vocab.items()
    ):
        raise ModelError(f"{path} is not a token -> id mapping", hint=_REMEDY)
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    data = _read_bytes(path, required=True)
    try:
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise ModelError(f"{path} is not UTF-8 text: {e}", hint=_REMEDY) from None
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ModelError(f"{path}, line {number}: expected two symbols, got {line[:60]!r}", hint=_REMEDY)
        merges.append((parts[0], parts[1]))
    return merges


# ------------------------------------------------------------------ exporting
def write_clip_tokenizer_files(bpe_gz_path, out_dir, *, pad_token: str = "<|endoftext|>") -> Path:
    """Turn OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` into a Hugging Face CLIP
    tokenizer folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) laid out like openai/clip-vit-large-patch14's
    (without ``tokenizer.json``, as the SD repositories on the Hub ship it).

    ``pad_token="<|endoftext|>"`` gives the SD 1.x folder, ``"!"`` the SD 2.x
    one. Returns ``out_dir``.
    """
    try:
        with gzip.open(bpe_gz_path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read CLIP BPE file {bpe_gz_path}: {e}", hint=_REMEDY) from None
    # Same slice as CLIP's SimpleTokenizer: skip the header, keep 49152-256-2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    if len(merges) != 49152 - 256 - 2 or any(len(m.split(" ")) != 2 for m in merges):
        raise ModelError(f"{bpe_gz_path} does not look like CLIP's BPE merges file", hint=_REMEDY)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + _EOW for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or pad_token not in vocab:
        raise ModelError(f"{bpe_gz_path}: inconsistent CLIP vocabulary (pad {pad_token!r})", hint=_REMEDY)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def special(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    smap = {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
            "pad_token": pad_token, "unk_token": special("<|endoftext|>")}
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **special("<|startoftext|>")},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **special("<|endoftext|>")},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **special("<|endoftext|>")},
    }
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(smap, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }
    for name, text in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out
