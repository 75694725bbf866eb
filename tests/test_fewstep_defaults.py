"""Generation defaults in the manifest (export/fewstep_defaults.py): the user's
``--default-steps`` / ``--default-guidance``, the known Turbo models (hub ids,
``--arch sd21-turbo``), LCMs; and ``cpuflow generate`` using them when the user
gives no ``--steps`` / ``--guidance`` (the user's flags still win)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cpuflow.cli import main
from cpuflow.errors import InvalidArgument
from cpuflow.image import read_png_metadata

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from export.fewstep_defaults import generation_defaults, is_known_turbo, user_defaults  # noqa: E402

EULER = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
LCM = {"_class_name": "LCMScheduler"}


def _quiet(*_a, **_k):
    return None


@pytest.mark.parametrize("source,turbo", [
    ({"kind": "hub", "name": "stabilityai/sd-turbo"}, True),
    ({"kind": "hub", "name": "StabilityAI/SDXL-Turbo"}, True),
    ({"kind": "random", "name": "sd21-turbo"}, True),
    ({"kind": "hub", "name": "stabilityai/stable-diffusion-2-1-base"}, False),
    ({"kind": "diffusers_folder", "name": "sd-turbo"}, False),   # a local copy: name alone proves nothing
    ({"kind": "random", "name": "sd21"}, False),
    (None, False),
])
def test_known_turbo_sources(source, turbo):
    assert is_known_turbo(source) is turbo
    got = generation_defaults(EULER, {}, source)
    assert got == ({"steps": 1, "guidance": 0.0} if turbo else {})


def test_rules_and_precedence():
    assert generation_defaults(LCM, {"time_cond_proj_dim": 256}) == {"steps": 4, "guidance": 8.5}
    assert generation_defaults(LCM, {}) == {"steps": 4, "guidance": 1.0}
    assert generation_defaults(EULER, {}, steps=6) == {"steps": 6}
    # the user wins over the Turbo and LCM rules, key by key
    turbo = {"kind": "hub", "name": "stabilityai/sd-turbo"}
    assert generation_defaults(EULER, {}, turbo, steps=2) == {"steps": 2, "guidance": 0.0}
    assert generation_defaults(LCM, {"time_cond_proj_dim": 8}, guidance=3) == {"steps": 4, "guidance": 3.0}


@pytest.mark.parametrize("steps,guidance,msg", [
    (0, None, "--default-steps 0"), (1001, None, "--default-steps 1001"), (2.5, None, "whole number"),
    (True, None, "--default-steps"), (None, -1.0, "--default-guidance -1.0"),
    (None, float("nan"), "--default-guidance nan"), (None, float("inf"), "from 0 to 100"),
    (None, 101, "--default-guidance 101"),
])
def test_bad_user_defaults_are_clear_errors(steps, guidance, msg):
    with pytest.raises(InvalidArgument, match=msg.replace("(", r"\(").replace(".", r"\.")):
        user_defaults(steps, guidance)


@pytest.fixture(scope="module")
def tiny_turbo(tmp_path_factory):
    from helpers_fewstep import save_tiny_turbo_folder
    base = tmp_path_factory.mktemp("tiny-turbo-defaults")
    return base, save_tiny_turbo_folder(base / "src")


def _manifest(model):
    return json.loads((model / "cpuflow.json").read_text())


def _generate(model, out, *args):
    r = CliRunner().invoke(main, ["generate", "--model", str(model), "a red circle", "--seed", "3", "--out",
                                  str(out), "--backend", "onnxruntime", "-q", *map(str, args)])
    assert r.exit_code == 0, r.output
    return read_png_metadata(out)


def test_cli_default_flags_are_recorded_and_used_by_generate(tiny_turbo, tmp_path):
    """A Turbo-style folder the export cannot recognise (a local folder): the
    user's --default-steps / --default-guidance go into cpuflow.json, and
    `cpuflow generate` uses them unless --steps / --guidance are given."""
    base, src = tiny_turbo
    out = base / "model-flags"
    from export.cli import export_command
    r = CliRunner().invoke(export_command, [str(src), str(out), "--format", "onnx", "--default-steps", "1",
                                            "--default-guidance", "0"])
    assert r.exit_code == 0, r.output
    assert _manifest(out)["defaults"] == {"steps": 1, "guidance": 0.0}
    meta = _generate(out, tmp_path / "a.png")
    assert (meta["steps"], meta["guidance"], meta["sampler"]) == (1, 0.0, "euler_a")
    meta = _generate(out, tmp_path / "b.png", "--steps", 3, "--guidance", 2.5)
    assert (meta["steps"], meta["guidance"]) == (3, 2.5)


def test_cli_bad_default_fails_before_loading(tiny_turbo, tmp_path):
    _, src = tiny_turbo
    from export.cli import export_command
    r = CliRunner().invoke(export_command, [str(src), str(tmp_path / "m"), "--default-steps", "0"])
    assert r.exit_code != 0
    assert "--default-steps 0 is invalid" in r.output and "[source]" not in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m").exists()


def test_turbo_hub_id_gets_one_step_no_guidance(tiny_turbo, tmp_path):
    """Loaded as if from the hub id stabilityai/sd-turbo (no hub access here: the
    tiny folder with the source record a hub load makes)."""
    from export.build import export_model
    from export.sources import load_source
    base, src = tiny_turbo
    loaded = load_source(str(src))
    loaded.source = dict(loaded.source, kind="hub", name="stabilityai/sd-turbo")
    out = export_model(loaded, base / "model-hub", formats=("onnx",), progress=_quiet)
    m = _manifest(out)
    assert m["source"]["name"] == "stabilityai/sd-turbo" and m["defaults"] == {"steps": 1, "guidance": 0.0}
    meta = _generate(out, tmp_path / "c.png")
    assert (meta["steps"], meta["guidance"]) == (1, 0.0)
    meta = _generate(out, tmp_path / "d.png", "--steps", 2)
    assert (meta["steps"], meta["guidance"]) == (2, 0.0)
    # the plain folder export of the same weights has no defaults: the runtime's 20 / 7.5
    plain = export_model(load_source(str(src)), base / "model-plain", formats=("onnx",), progress=_quiet)
    assert "defaults" not in _manifest(plain)
    meta = _generate(plain, tmp_path / "e.png")
    assert (meta["steps"], meta["guidance"]) == (20, 7.5)


def test_random_arch_sd21_turbo_is_recognised(monkeypatch):
    """`--random-weights --arch sd21-turbo` (full size: the modules are stubbed
    here) makes a source record the rule recognises, with SD-Turbo's scheduler."""
    from export import sources
    monkeypatch.setattr(sources, "_build", lambda comp, cfg, empty: torch.nn.Identity())
    monkeypatch.setattr(sources, "_resolve_tokenizer", lambda *a, **k: (None, "stub"))
    loaded = sources.load_source(None, random_weights=True, arch="sd21-turbo")
    assert loaded.source["kind"] == "random" and loaded.source["name"] == "sd21-turbo"
    assert generation_defaults(loaded.scheduler_config, {}, loaded.source) == {"steps": 1, "guidance": 0.0}
    plain = sources.load_source(None, random_weights=True, arch="sd21")
    assert generation_defaults(plain.scheduler_config, {}, plain.source) == {}
