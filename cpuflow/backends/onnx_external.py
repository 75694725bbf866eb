"""Refuse ONNX files whose external data points outside their folder.

An ONNX model keeps large tensors in side files named by each tensor's
``external_data`` entry ``location``. ONNX Runtime and OpenVINO open whatever
that says, so a crafted model could read ``/etc/passwd``, ``../../secret`` or
follow a symlink out of the model folder (and ONNX Runtime even treats the
location ``*/_ORT_MEM_ADDR_/*`` as a raw memory address). Before any backend
reads an ``.onnx`` file we list every location and check it like
:func:`cpuflow.manifest.safe_join` does, relative to the model file's folder.

The ``onnx`` package is no runtime dependency, so this is a tiny protobuf
wire-format walker over a read-only memory map (weights embedded in the file
are skipped, never copied). It visits::

    ModelProto.graph (7), .functions (25), .training_info (20: initialization 1, algorithm 2)
    GraphProto.node (1), .initializer (5), .sparse_initializer (15)
    NodeProto.attribute (5)
    AttributeProto.t (5), .g (6), .tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23)
    FunctionProto.node (7)
    SparseTensorProto.values (1), .indices (2)
    TensorProto.external_data (13: StringStringEntryProto key 1, value 2), .data_location (14)
"""
from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import Iterator

from ..errors import ModelError, UnsafeFileError
from ..manifest import safe_join

_EXTERNAL = 1          # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 48        # nested subgraphs; deeper is refused, not recursed into
_ORT_MEM_ADDR = "_ORT_MEM_ADDR_"


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint too long")


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message; length-delimited values
    are (start, end) offsets into ``buf``."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wt == 0:
            v, pos = _varint(buf, pos, end)
            yield field, wt, v
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            s = pos
            pos += n
            if pos > end:
                raise _Malformed("length past the end of its message")
            yield field, wt, (s, pos)
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:  # groups (3, 4) never appear in ONNX; 6, 7 are invalid
            raise _Malformed(f"unsupported wire type {wt}")
        if pos > end:
            raise _Malformed("field past the end of its message")


class _Scan:
    def __init__(self, buf):
        self.buf = buf
        self.locations: list[str] = []
        self.external_without_location: list[str] = []

    def _str(self, span) -> str:
        s, e = span
        try:
            return bytes(self.buf[s:e]).decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafeFileError("an external data location is not valid UTF-8") from None

    def model(self, s: int, e: int) -> None:
        for f, wt, v in _fields(self.buf, s, e):
            if wt != 2:
                continue
            if f == 7:
                self.graph(*v, 1)
            elif f == 25:
                self.function(*v, 1)
            elif f == 20:
                for f2, wt2, v2 in _fields(self.buf, *v):
                    if wt2 == 2 and f2 in (1, 2):
                        self.graph(*v2, 1)

    def _depth(self, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise UnsafeFileError(f"subgraphs nested deeper than {_MAX_DEPTH} levels")

    def graph(self, s: int, e: int, depth: int) -> None:
        self._depth(depth)
        for f, wt, v in _fields(self.buf, s, e):
            if wt != 2:
                continue
            if f == 1:
                self.node(*v, depth)
            elif f == 5:
                self.tensor(*v)
            elif f == 15:
                self.sparse(*v)

    def function(self, s: int, e: int, depth: int) -> None:
        self._depth(depth)
        for f, wt, v in _fields(self.buf, s, e):
            if wt == 2 and f == 7:
                self.node(*v, depth)

    def node(self, s: int, e: int, depth: int) -> None:
        for f, wt, v in _fields(self.buf, s, e):
            if wt == 2 and f == 5:
                self.attribute(*v, depth)

    def attribute(self, s: int, e: int, depth: int) -> None:
        for f, wt, v in _fields(self.buf, s, e):
            if wt != 2:
                continue
            if f in (5, 10):
                self.tensor(*v)
            elif f in (6, 11):
                self.graph(*v, depth + 1)
            elif f in (22, 23):
                self.sparse(*v)

    def sparse(self, s: int, e: int) -> None:
        for f, wt, v in _fields(self.buf, s, e):
            if wt == 2 and f in (1, 2):
                self.tensor(*v)

    def tensor(self, s: int, e: int) -> None:
        location = None
        external = False
        name = ""
        for f, wt, v in _fields(self.buf, s, e):
            if f == 13 and wt == 2:
                key = val = None
                for f2, wt2, v2 in _fields(self.buf, *v):
                    if wt2 == 2 and f2 == 1:
                        key = self._str(v2)
                    elif wt2 == 2 and f2 == 2:
                        val = v2
                if key == "location":
                    location = self._str(val) if val is not None else ""
                    self.locations.append(location)
            elif f == 14 and wt == 0:
                external = v == _EXTERNAL
            elif f == 8 and wt == 2:
                name = bytes(self.buf[v[0]:v[1]]).decode("utf-8", "replace")
        if external and location is None:
            self.external_without_location.append(name)


def external_data_locations(model_file: str | os.PathLike) -> list[str]:
    """Every external-data ``location`` in the ONNX file, in file order, without
    duplicates. Raises :class:`ModelError` if the file is no valid protobuf."""
    path = Path(model_file)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelError(f"model file {path} is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                scan = _Scan(mm)
                try:
                    scan.model(0, size)
                except _Malformed as e:
                    raise ModelError(f"model file {path} is not a valid ONNX protobuf ({e}); "
                                     "it may be truncated or damaged") from None
                except UnsafeFileError as e:
                    raise UnsafeFileError(f"model file {path.name}: {e.message}") from None
                finally:
                    scan.buf = None
    except OSError as e:
        raise ModelError(f"cannot read model file {path} ({e.strerror or e})") from None
    if scan.external_without_location:
        raise UnsafeFileError(f"model file {path.name}: tensor {scan.external_without_location[0]!r} "
                              "is stored externally but names no location")
    seen: dict[str, None] = {}
    for loc in scan.locations:
        seen.setdefault(loc, None)
    return list(seen)


def check_external_data(model_file: str | os.PathLike) -> list[Path]:
    """Refuse (:class:`UnsafeFileError`, naming the location) any external-data
    location that is absolute, contains ``..``, resolves outside the model
    file's folder (symlinks), or is ONNX Runtime's in-memory address marker;
    and any that is not a regular file. Returns the data files' paths."""
    path = Path(model_file)
    folder = path.parent
    out = []
    for loc in external_data_locations(path):
        if _ORT_MEM_ADDR in loc or loc.startswith("*"):
            raise UnsafeFileError(f"model file {path.name}: external data location {loc!r} is a memory "
                                  "address marker, not a file; refusing to load it")
        try:
            p = safe_join(folder, loc)
        except UnsafeFileError as e:
            raise UnsafeFileError(f"model file {path.name}: external data location {loc!r} is refused: "
                                  f"{e.message}") from None
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise ModelError(f"model file {path.name}: external data file {loc!r} is missing from {folder}",
                             hint="re-export the model with `cpuflow export`") from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"model file {path.name}: external data location {loc!r} is not a regular file")
        out.append(p)
    return out
