"""The compiled-model cache never fills the disk: a new compiled blob (about the
size of the model's weights) is written only if 2 GiB stay free after it;
otherwise the component compiles without the cache and the user is told why.
(A full-size SDXL UNet's blobs are > 10 GB; one such write once left this build
machine with 587 MB free.) The disk is simulated by replacing cache.disk_free."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpuflow import Pipeline
from cpuflow.backends import cache as cache_mod

pytest.importorskip("openvino")


def _blobs(root: Path) -> list[Path]:
    return list(root.rglob("*.blob"))


def _generate(model, cache_dir):
    with Pipeline.load(model, backend="openvino", precision="f32", threads=1, cache_dir=str(cache_dir)) as p:
        return p.txt2img("a red circle", steps=1, width=64, height=64, seed=1)


def test_a_nearly_full_disk_compiles_without_the_cache_and_says_so(tiny_export, tmp_path, monkeypatch):
    model = tiny_export("sd1").model
    monkeypatch.setattr(cache_mod, "disk_free", lambda path: 1024 ** 3)   # 1 GiB free: below the 2 GiB reserve
    res = _generate(model, tmp_path / "cache")
    assert res.images[0].size == (64, 64)
    assert _blobs(tmp_path / "cache") == []
    notes = [w for w in res.warnings if "compiled without the cache" in w]
    assert notes and "GiB are free" in notes[0] and "CPUFLOW_CACHE_DIR" in notes[0], res.warnings


def test_with_room_the_cache_is_written_and_reused(tiny_export, tmp_path, monkeypatch):
    model = tiny_export("sd1").model
    monkeypatch.setattr(cache_mod, "disk_free", lambda path: 100 * 1024 ** 3)
    first = _generate(model, tmp_path / "cache")
    assert _blobs(tmp_path / "cache")
    assert not any("compiled without the cache" in w for w in first.warnings)
    # a blob already there is loaded even when the disk is full now: nothing new is written
    monkeypatch.setattr(cache_mod, "disk_free", lambda path: 0)
    second = _generate(model, tmp_path / "cache")
    assert not any("compiled without the cache" in w for w in second.warnings)
    assert second.images[0].tobytes() == first.images[0].tobytes()


def test_room_for_blob_keeps_two_gib_free():
    fits, _ = cache_mod.room_for_blob("/", 0)
    assert isinstance(fits, bool)
    real = cache_mod.disk_free
    try:
        cache_mod.disk_free = lambda p: 3 * 1024 ** 3
        assert cache_mod.room_for_blob("/x", 512 * 1024 ** 2) == (True, 3 * 1024 ** 3)
        assert cache_mod.room_for_blob("/x", 2 * 1024 ** 3)[0] is False
    finally:
        cache_mod.disk_free = real
