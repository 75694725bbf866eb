"""Issue 17 item 2: a corrupted compiled-model cache never gives wrong images
(cpuflow/backends/blob_digests.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cpuflow import Pipeline
from cpuflow.backends.blob_digests import RECORD

ASK = dict(seed=3, steps=2)


def generate(cache):
    with Pipeline.load(None, backend="openvino", precision="f32", threads=2, cache_dir=cache) as p:
        r = p.txt2img("a red circle on a blue background", **ASK)
        cached = {name: info.cached for name, (info, _variant) in p.model.session_infos().items()}
    return np.asarray(r.images[0], np.int16), r.warnings, cached


def blobs(cache):
    return sorted(cache.glob("openvino/*/*.blob"))


def flip(path, n=4096):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0x5A for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


@pytest.fixture
def warm_cache(tmp_path):
    cache = tmp_path / "cache"
    right, warnings, cached = generate(cache)
    assert warnings == [] and not any(cached.values())
    assert blobs(cache) and all((b.parent / RECORD).is_file() for b in blobs(cache))
    again, warnings, cached = generate(cache)
    assert warnings == [] and all(cached.values())        # the digests check passes: blobs imported
    assert np.array_equal(again, right)
    return cache, right


def test_damaged_blobs_are_deleted_recompiled_and_reported(warm_cache):
    cache, right = warm_cache
    for b in blobs(cache):
        flip(b)
    img, warnings, cached = generate(cache)
    assert np.array_equal(img, right)
    assert not any(cached.values())                          # compiled again, not imported
    # one line per component whose blob was damaged, naming it
    assert sorted(w.split(":")[0] for w in warnings) == sorted(cached), warnings
    assert all("damaged blob" in w and "compiled again" in w for w in warnings)
    img, warnings, cached = generate(cache)                  # the new blobs are recorded and trusted
    assert warnings == [] and all(cached.values()) and np.array_equal(img, right)


def test_a_blob_without_a_record_is_not_imported(warm_cache):
    cache, right = warm_cache
    for rec in cache.glob(f"openvino/*/{RECORD}"):
        rec.unlink()
    for b in blobs(cache):
        flip(b)
    img, warnings, cached = generate(cache)
    assert np.array_equal(img, right) and not any(cached.values()) and warnings == []


def test_damaged_blob_warning_reaches_the_cli(warm_cache, tmp_path):
    from click.testing import CliRunner

    from cpuflow.cli import main
    cache, _ = warm_cache
    flip(sorted(cache.glob("openvino/*unet*/*.blob"))[0])
    r = CliRunner(env={"CPUFLOW_CACHE_DIR": str(cache)}).invoke(
        main, ["generate", "a red circle", "--precision", "f32", "--threads", "2", "--seed", "3", "--steps", "2",
               "--out", str(tmp_path / "x.png"), "-q"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "unet" in lines[0] and "damaged blob" in lines[0], r.output


def test_onnxruntime_saved_graphs_give_the_same_image(tmp_path):
    """#16 item 12: the second ORT start loads the saved optimised graphs, and the
    image is the one a start without any cache makes, bit for bit."""
    def run(cache):
        with Pipeline.load(None, backend="onnxruntime", threads=2, cache_dir=cache, use_cache=cache is not None) as p:
            r = p.txt2img("a red circle on a blue background", **ASK)
            cached = {name: info.cached for name, (info, _variant) in p.model.session_infos().items()}
        return np.asarray(r.images[0], np.int16), r.warnings, cached

    plain, _, cached = run(None)
    assert not any(cached.values())
    cache = tmp_path / "cache"
    first, warnings, cached = run(cache)
    assert warnings == [] and not any(cached.values()) and np.array_equal(first, plain)
    again, warnings, cached = run(cache)
    assert warnings == [] and all(cached.values()) and np.array_equal(again, plain)
