"""Issue 17 items 5 and 7: every number the runtime reads from cpuflow.json is
checked on load (cpuflow/manifest_values.py), with the file and key named, exit 3."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from cpuflow.cli import main
from cpuflow.errors import ManifestError
from cpuflow.manifest import MANIFEST_NAME, load_manifest
from cpuflow.pipelines.model import shipped_model_dir

NAN, INF = float("nan"), float("inf")

BAD = [
    ("defaults.guidance", ("defaults", "guidance"), "x"),
    ("defaults.steps", ("defaults", "steps"), "abc"),
    ("defaults.steps", ("defaults", "steps"), 0),
    ("defaults.steps", ("defaults", "steps"), 2.5),
    ("defaults.guidance", ("defaults", "guidance"), NAN),
    ("defaults.guidance", ("defaults", "guidance"), -1),
    ("defaults.precision", ("defaults", "precision"), "fp8"),
    ("default_size", ("default_size",), {"width": 100000, "height": 100000}),
    ("default_size.width", ("default_size", "width"), 0),
    ("default_size.width", ("default_size", "width"), 100),
    ("default_size.height", ("default_size", "height"), "64"),
    ("latent.scaling_factor", ("latent", "scaling_factor"), NAN),
    ("latent.scaling_factor", ("latent", "scaling_factor"), 0),
    ("latent.shift_factor", ("latent", "shift_factor"), INF),
    ("latent.channels", ("latent", "channels"), 4.5),
    ("latent.downscale", ("latent", "downscale"), 6),
    ("tokenizer.bos_token_id", ("tokenizer", "bos_token_id"), 99999999),
    ("tokenizer.eos_token_id", ("tokenizer", "eos_token_id"), -1),
    ("tokenizer.max_length", ("tokenizer", "max_length"), 0),
]


def with_value(tmp_path, keys, value):
    """The shipped model with one manifest value replaced."""
    d = tmp_path / "m"
    if not d.exists():
        shutil.copytree(shipped_model_dir(), d)
    data = json.loads((d / MANIFEST_NAME).read_text())
    obj = data
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value
    (d / MANIFEST_NAME).write_text(json.dumps(data))   # NaN / Infinity as Python's json writes them
    return d


@pytest.mark.parametrize("key, keys, value", BAD, ids=[f"{k}={v!r}" for k, _, v in BAD])
def test_bad_value_is_refused_on_load_naming_file_and_key(tmp_path, key, keys, value):
    d = with_value(tmp_path, keys, value)
    with pytest.raises(ManifestError) as e:
        load_manifest(d, verify=False)
    msg = str(e.value)
    assert f"{d / MANIFEST_NAME}: {key}:" in msg, msg


@pytest.mark.parametrize("keys, value", [(("defaults", "guidance"), "x"), (("defaults", "steps"), "abc"),
                                         (("default_size", "width"), 0),
                                         (("latent", "scaling_factor"), NAN)])
def test_generate_exits_3_with_one_line(tmp_path, keys, value):
    d = with_value(tmp_path, keys, value)
    out = tmp_path / "never.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(d), "a red circle", "--out", str(out), "-q"])
    assert r.exit_code == 3, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and ".".join(keys) in r.output
    assert "Traceback" not in r.output and not out.exists()


def test_serve_refuses_the_folder_before_listening(tmp_path):
    pytest.importorskip("fastapi")
    from cpuflow.server.app import create_app
    d = with_value(tmp_path, ("defaults", "guidance"), "x")
    with pytest.raises(ManifestError, match="defaults.guidance"):
        create_app({"m": d})


def test_the_shipped_manifest_and_good_values_pass(tmp_path):
    load_manifest(shipped_model_dir(), verify=False)
    load_manifest(with_value(tmp_path, ("defaults", "steps"), 1000), verify=False)
    load_manifest(with_value(tmp_path, ("default_size",), {"width": 2048, "height": 2048}), verify=False)
