"""Textual-inversion embeddings, read without torch and without running pickled code.

Formats (what users download):

* A1111 ``.pt`` (torch's zip format): ``{"string_to_param": {"*": tensor[n, width]}, "name": ...}``;
* A1111 / civitai ``.safetensors``: ``{"emb_params": [n, width]}``, SDXL ones
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (two parts: one per text encoder);
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": tensor[width] or [n, width]}``.

The word that calls an embedding in a prompt is ``--embedding FILE:TOKEN``'s TOKEN,
else the diffusers key, else the file name without extension (as A1111).

``.pt`` / ``.bin`` files are pickles. Unpickling one with ``pickle`` or
``torch.load`` (without ``weights_only``) runs whatever code it names. Here a
restricted unpickler accepts only the few globals a tensor dictionary needs
(torch's tensor rebuild function and storage types, OrderedDict), and maps them
to numpy code of our own: a file that names anything else (``os.system``,
``builtins.eval``, ...) is refused with :class:`UnsafeFileError` before anything
of it runs. safetensors files are a JSON header and raw little-endian data.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import InvalidArgument, UnsafeFileError

MAX_FILE_BYTES = 64 * 1024 * 1024      # an embedding is a few KB to a few MB
# Which part of an SDXL embedding goes to which text encoder.
SDXL_PARTS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "bf16"}
_STORAGE_DTYPES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8",
                   "BFloat16Storage": "bf16", "LongStorage": "<i8", "IntStorage": "<i4"}


@dataclass(frozen=True)
class Embedding:
    name: str                         # the word in the prompt
    parts: Mapping[str, np.ndarray]   # "" (one-encoder models) or clip_l / clip_g -> (n, width) float32
    path: str

    @property
    def n_vectors(self) -> int:
        return next(iter(self.parts.values())).shape[0]


class EmbeddingSet:
    """The embeddings of one request."""

    def __init__(self, embeddings: Sequence[Embedding]):
        names = [e.name for e in embeddings]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InvalidArgument(f"two embeddings are called {sorted(dup)[0]!r}; give one a name with FILE:TOKEN")
        self.embeddings = list(embeddings)

    @classmethod
    def load(cls, specs: Sequence[str]) -> "EmbeddingSet | None":
        return cls([load_embedding(s) for s in specs]) if specs else None

    def words(self, encode: Callable[[str], Sequence[int]]):
        """(token ids of each name, name, number of vectors) for the chunker."""
        out = []
        for e in self.embeddings:
            ids = tuple(encode(e.name))
            if not ids:
                raise InvalidArgument(f"embedding name {e.name!r} has no tokens; give it a word with FILE:TOKEN")
            out.append((ids, e.name, e.n_vectors))
        return out

    def vectors_for(self, encoder: str, width: int, *, sdxl: bool) -> dict[str, np.ndarray]:
        """name -> (n, width) vectors for one text encoder; a clear error when
        an embedding was made for another model family or text encoder."""
        out = {}
        for e in self.embeddings:
            if sdxl and "" in e.parts:
                raise InvalidArgument(f"embedding {e.name!r} ({e.path}) is made for one text encoder; this SDXL "
                                      "model needs an SDXL embedding (clip_l and clip_g)")
            if not sdxl and "" not in e.parts:
                raise InvalidArgument(f"embedding {e.name!r} ({e.path}) is an SDXL embedding (clip_l / clip_g); "
                                      "this model has one text encoder")
            v = e.parts[""] if "" in e.parts else e.parts[SDXL_PARTS[encoder]]
            if v.shape[1] != width:
                raise InvalidArgument(
                    f"embedding {e.name!r} ({e.path}) is made for a text encoder of width {v.shape[1]}; "
                    f"this model's {encoder} has width {width} (an embedding for another model family)")
            out[e.name] = v
        return out


EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def embedding_files(directory: str | Path) -> list[str]:
    """The embedding files a user put in ``directory`` (``cpuflow serve
    --embeddings-dir``): its regular files ending in .pt, .safetensors or .bin,
    sorted, not hidden, not in subfolders, and none whose real path leaves the
    folder (a symlink to elsewhere is not listed). Returned as resolved paths:
    the server reads them itself and requests name them by their word only."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidArgument(f"embeddings folder not found: {root}")
    root = root.resolve()
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in EMBEDDING_SUFFIXES:
            continue
        real = p.resolve()
        if real.parent != root or not real.is_file():
            continue
        out.append(str(real))
    return out


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:TOKEN`` (a colon that is part of an existing path stays in it)."""
    p = Path(spec)
    if p.exists() or ":" not in spec:
        return p, None
    file, _, token = spec.rpartition(":")
    if not token or "/" in token or "\\" in token:
        return p, None
    return Path(file), token


def load_embedding(spec: str) -> Embedding:
    path, token = split_spec(spec)
    if not path.is_file():
        raise InvalidArgument(f"embedding file not found: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InvalidArgument(f"{path} is {size} bytes: too big for a textual-inversion embedding")
    data = path.read_bytes()
    if data[:2] == b"PK":
        tensors = read_torch_zip(data, str(path))
    elif data[:1] in (b"\x80",) and path.suffix.lower() in (".pt", ".bin", ".ckpt"):
        raise UnsafeFileError(f"{path} is a legacy (pre-zip) torch pickle; cpuflow does not unpickle those",
                              hint="re-save it as .safetensors")
    else:
        tensors = read_safetensors(data, str(path))
    return _interpret(tensors, path, token)


def _interpret(data, path: Path, token: str | None) -> Embedding:
    def f32(a) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return a[None, :] if a.ndim == 1 else a

    if isinstance(data, Mapping) and "string_to_param" in data:          # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise InvalidArgument(f"{path}: an A1111 embedding with {len(params)} parameters (expected one)")
        parts = {"": f32(next(iter(params.values())))}
        name = token or path.stem
    elif isinstance(data, Mapping) and "clip_l" in data and "clip_g" in data:   # SDXL
        parts = {"clip_l": f32(data["clip_l"]), "clip_g": f32(data["clip_g"])}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise InvalidArgument(f"{path}: clip_l and clip_g have different numbers of vectors")
        name = token or path.stem
    elif isinstance(data, Mapping) and "emb_params" in data:               # A1111 .safetensors
        parts = {"": f32(data["emb_params"])}
        name = token or path.stem
    elif isinstance(data, Mapping) and len(data) == 1 and isinstance(next(iter(data.values())), np.ndarray):
        key, value = next(iter(data.items()))                               # diffusers learned_embeds
        parts = {"": f32(value)}
        name = token or str(key)
    else:
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise InvalidArgument(f"{path} is not a textual-inversion embedding cpuflow knows (keys: {keys})")
    for k, v in parts.items():
        if v.ndim != 2 or v.shape[0] < 1 or not np.isfinite(v).all():
            raise InvalidArgument(f"{path}: embedding vectors {k or ''} have shape {v.shape} or are not finite")
    return Embedding(name, parts, str(path))


# --- safetensors -----------------------------------------------------------------
def read_safetensors(data: bytes, where: str) -> dict[str, np.ndarray]:
    if len(data) < 8:
        raise InvalidArgument(f"{where} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise InvalidArgument(f"{where} is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise InvalidArgument(f"{where} is not a safetensors file (the header is not JSON)") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{where}: bad safetensors entry {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise InvalidArgument(f"{where}: tensor {name!r} has dtype {dtype}, not a float type")
        if not 0 <= a <= b <= len(body):
            raise InvalidArgument(f"{where}: tensor {name!r} lies outside the file")
        out[name] = _array(bytes(body[a:b]), _ST_DTYPES[dtype], shape, f"{where}: {name}")
    return out


def _array(raw: bytes, dtype: str, shape, what: str) -> np.ndarray:
    if dtype == "bf16":   # the top half of a float32
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        a = u.view(np.float32)
    else:
        a = np.frombuffer(raw, dtype=dtype)
    if a.size != int(np.prod(shape)):
        raise InvalidArgument(f"{what}: {a.size} values for shape {list(shape)}")
    return a.reshape(shape).astype(np.float32)


# --- torch's zip format, unpickled without code ------------------------------------
class _Storage:
    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    a = storage.array
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not size:
        return np.array(a[offset], dtype=np.float32)
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= a.size:
        raise InvalidArgument("a tensor in the file lies outside its storage")
    view = np.lib.stride_tricks.as_strided(a[offset:], shape=size, strides=[s * a.itemsize for s in stride])
    return np.array(view, dtype=np.float32)


def _rebuild_parameter(data, *_rest):
    return data


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _SafeUnpickler(pickle.Unpickler):
    """Only tensors, dicts, lists and plain values come out; any other global is refused."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, where: str):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.where = zf, prefix, where

    def find_class(self, module: str, name: str):
        allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                   ("collections", "OrderedDict"): OrderedDict}
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeFileError(f"{self.where} refers to {module}.{name}, which is not part of a tensor file; "
                              "refused (a pickle can run code when loaded)",
                              hint="use a .safetensors embedding, or one you trust re-saved as safetensors")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeFileError(f"{self.where}: unexpected persistent id in the pickle; refused")
        key = str(pid[2])
        try:
            raw = self.zf.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise InvalidArgument(f"{self.where}: storage {key} is missing from the file") from None
        dt = pid[1].dtype
        if dt == "bf16":
            return _Storage(_array(raw, dt, [len(raw) // 2], self.where))
        return _Storage(np.frombuffer(raw, dtype=dt))


def read_torch_zip(data: bytes, where: str):
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise InvalidArgument(f"{where} is a zip file but not a torch tensor file")
        prefix = pkl[0][: -len("data.pkl")]
        return _SafeUnpickler(zf.read(pkl[0]), zf, prefix, where).load()
    except zipfile.BadZipFile:
        raise InvalidArgument(f"{where} is a damaged zip / torch file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise InvalidArgument(f"{where}: cannot read the torch file ({type(e).__name__}: {e})") from None
