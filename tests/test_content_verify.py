"""Issue 17 item 1: a model folder is verified by content by default, without
hashing every file at every start (cpuflow/file_digests.py)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from cpuflow import Pipeline
from cpuflow.cli import main
from cpuflow.errors import IntegrityError
from cpuflow.file_digests import MEMO_NAME, DigestMemo
from cpuflow.manifest import MANIFEST_NAME
from cpuflow.pipelines.model import shipped_model_dir


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(shipped_model_dir(), d)
    return d


def flip_64_bytes(path):
    """Same size, different bytes (what a bad disk or a bad copy does)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    assert path.stat().st_size == size


@pytest.mark.parametrize("backend, rel", [("openvino", "unet/openvino_model.bin"),
                                          ("onnxruntime", "unet/model.onnx_data")])
def test_same_size_corruption_is_refused_by_default(folder, tmp_path, backend, rel):
    # A first start that verifies the intact folder (so its digests are remembered) ...
    Pipeline.load(folder, backend=backend).close()
    # ... must not hide a later corruption.
    flip_64_bytes(folder / rel)
    with pytest.raises(IntegrityError, match=rel.replace(".", r"\.")):
        Pipeline.load(folder, backend=backend)
    out = tmp_path / "never.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(folder), "a red circle", "--steps", "2",
                                  "--backend", backend, "--out", str(out), "-q"])
    assert r.exit_code == 3, r.output
    assert rel in r.output and "re-export" in r.output
    assert not out.exists()


def test_a_wrong_sha256_in_the_manifest_is_refused(folder):
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["files"]["unet/openvino_model.bin"]["sha256"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="unet/openvino_model.bin"):
        Pipeline.load(folder, backend="openvino")


def test_files_are_hashed_once_then_again_only_when_changed(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(1 << 16))
    memo_path = tmp_path / MEMO_NAME
    first = DigestMemo(memo_path)
    d1 = first.sha256(f)
    first.save()
    assert first.hashed == 1
    later = DigestMemo(memo_path)               # a later start
    assert later.sha256(f) == d1 and later.hashed == 0
    flip_64_bytes(f)
    again = DigestMemo(memo_path)
    d2 = again.sha256(f)
    assert again.hashed == 1 and d2 != d1
    # a damaged memo is only a memo: everything is hashed again
    memo_path.write_text("{not json")
    assert DigestMemo(memo_path).sha256(f) == d2


def test_later_starts_reuse_the_memo_in_the_private_cache(folder, tmp_path):
    cache = tmp_path / "cache"
    Pipeline.load(folder, backend="openvino", cache_dir=cache).close()
    memo = DigestMemo.in_cache(cache)
    assert memo.path == cache / MEMO_NAME and (cache.stat().st_mode & 0o777) == 0o700
    for rel in json.loads((folder / MANIFEST_NAME).read_text())["files"]:
        memo.sha256(folder / rel)
    assert memo.hashed == 0                     # every file was remembered by the first start
