"""Bring the shipped model (cpuflow/models/default) to the current manifest schema
without changing a single weight.

The model was exported before manifest schema 2: its text encoder takes token
ids and gives only ``last_hidden_state``, and its UNet declares a text length of
77, so on it long prompts used one chunk and clip skip and textual-inversion
embeddings were refused. Retraining or a full re-export would change the images
people already made with it (the int8 UNet is calibrated with bf16 on the
exporting CPU), so this script changes only what schema 2 changed:

1. the torch modules are rebuilt from the shipped ONNX files
   (export/rebuild_from_onnx.py; each checked against them to >= 100 dB);
2. the whole model goes through the normal export stage (export_model, both
   formats, the folder's own quantized modes, parity gates) into a scratch folder;
3. from that export only the text encoder is taken: its files (inputs_embeds,
   hidden_states, token_embeddings.npy), its manifest entry and variants;
4. the UNet files stay as they are: their weights (``.onnx_data`` / ``.bin``)
   byte for byte; only the graphs' declaration of the text input changes
   (77 -> the symbol ``text_length``), which the graphs already compute for
   any length (cross-attention keys and values are length-agnostic). The VAE
   files are not touched at all;
5. the manifest is the old one with the new text encoder, the UNet's symbolic
   text length, the file records of the files that changed, schema 2 and an
   ``export.reexport`` record of what was done.

    python scripts/reexport_default_model.py --work /tmp/reexport            # in place
    python scripts/reexport_default_model.py --work /tmp/reexport --out DIR  # elsewhere

About a minute on a 2-core CPU. tests/test_default_model.py checks that the
result gives the old folder's images bit for bit.

``--requantize MODE`` (schema 2 folders) re-makes only the UNet's MODE variant
(``int8``) with the current recipe (export/quantize.py) from the shipped fp32 UNet
files themselves, which are not rewritten (byte for byte the same): calibration
on the folder's own sampling loop at its default guidance (export/calibrate.py),
the parity gate against the torch UNet rebuilt from the shipped ONNX, the new
files' records and figures in the manifest, ``export.requantize`` saying what was done:

    python scripts/reexport_default_model.py --work /tmp/requant --requantize int8

``--remeasure`` (schema 2 folders) changes no file but ``cpuflow.json``: it runs the
held-out sampling run again (the export's: same prompt count, steps, seed, the model's
default guidance) and records, for every quantized UNet variant and format, the held-out
figures the current export records (export/quantize.py ``held_out_entry``: PSNR pooled over
every call, worst call, mean), ``export.remeasure`` saying what was done. A few seconds:

    python scripts/reexport_default_model.py --work /tmp/remeasure --remeasure
"""
from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpuflow.manifest import MANIFEST_NAME, SCHEMA_VERSION, file_record, write_manifest  # noqa: E402

TEXT_INPUT = "encoder_hidden_states"


def declare_text_length_onnx(path: Path, symbol: str) -> None:
    """Declare the UNet's text dimension as ``symbol`` in the ONNX graph's input;
    the external weights file is not read or written."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    (inp,) = [i for i in m.graph.input if i.name == TEXT_INPUT]
    dim = inp.type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = symbol
    onnx.save(m, str(path))


def declare_text_length_openvino(path: Path) -> None:
    """The same for an OpenVINO IR: the Parameter's declared shape gets a dynamic
    text dimension (the runtime reshapes to the prompt's length; the .bin is untouched)."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f'name="{TEXT_INPUT}" type="Parameter"')
    end = text.index("</layer>", start)
    layer = text[start:end]
    new = layer.replace('shape="?,77,', 'shape="?,?,', 1)
    new = new.replace("<dim>77</dim>", "<dim>-1</dim>", 1)
    if new.count("?,?,") != 1 or "<dim>-1</dim>" not in new[new.index("<port"):]:
        raise click.ClickException(f"{path}: unexpected {TEXT_INPUT} declaration: {layer[:300]}")
    path.write_text(text[:start] + new + text[end:], encoding="utf-8")


def compose(old_dir: Path, new_export: Path, out: Path, rebuilt_db: dict[str, float]) -> None:
    from export.build import tool_versions

    old = json.loads((old_dir / MANIFEST_NAME).read_text())
    new = json.loads((new_export / MANIFEST_NAME).read_text())
    if old.get("schema_version") != 1:
        raise click.ClickException(f"{old_dir} is schema {old.get('schema_version')}: nothing to do")
    if set(new["components"]["text_encoder"]["variants"]) != set(old["components"]["text_encoder"]["variants"]):
        raise click.ClickException("the re-export's text-encoder variants differ from the shipped ones: "
                                   f"{sorted(new['components']['text_encoder']['variants'])} vs "
                                   f"{sorted(old['components']['text_encoder']['variants'])}")
    staging = out.with_name(out.name + ".reexport-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(old_dir, staging)
    data = dict(old)
    # 3. the text encoder: the new export's files and entry
    shutil.rmtree(staging / "text_encoder")
    shutil.copytree(new_export / "text_encoder", staging / "text_encoder")
    files = {k: v for k, v in old["files"].items() if not k.startswith("text_encoder/")}
    te = new["components"]["text_encoder"]
    named = {p for var in te["variants"].values() for paths in var["files"].values() for p in paths}
    named.add(te["config"]["token_embeddings"]["path"])
    for p in sorted((staging / "text_encoder").iterdir()):
        rel = f"text_encoder/{p.name}"
        if rel in named:
            files[rel] = new["files"][rel]
        else:
            p.unlink()
    components = dict(old["components"])
    components["text_encoder"] = te
    # 4. the UNet: same files, the text length declared symbolic
    unet = json.loads(json.dumps(old["components"]["unet"]))
    new_ehs = next(s for s in new["components"]["unet"]["inputs"] if s["name"] == TEXT_INPUT)
    for s in unet["inputs"]:
        if s["name"] == TEXT_INPUT:
            symbol = new_ehs["shape"][1]
            assert isinstance(symbol, str) and s["shape"][1] == old["tokenizer"]["max_length"]
            s["shape"] = [s["shape"][0], symbol, s["shape"][2]]
    graphs = sorted({p for var in unet["variants"].values() for paths in var["files"].values()
                     for p in paths if p.endswith((".onnx", ".xml"))})
    for rel in graphs:
        if rel.endswith(".onnx"):
            declare_text_length_onnx(staging / rel, symbol)
        else:
            declare_text_length_openvino(staging / rel)
        files[rel] = file_record(staging, rel)
    components["unet"] = unet
    data["components"] = components
    data["files"] = dict(sorted(files.items()))
    data["schema_version"] = SCHEMA_VERSION
    data["validated"] = bool(old["validated"] and new["validated"])
    data["export"] = {**old["export"], "reexport": {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "schema_from": 1, "schema_to": SCHEMA_VERSION, "tools": tool_versions(),
        "how": "scripts/reexport_default_model.py: text_encoder re-exported from torch modules rebuilt from "
               "the shipped ONNX (weights unchanged); unet graphs declare a symbolic text length, their "
               "weights files unchanged; vae files unchanged",
        "rebuilt_vs_shipped_psnr_db": {k: round(v, 1) for k, v in rebuilt_db.items()},
    }}
    write_manifest(staging, data)
    _into_place(staging, out)


def _into_place(staging: Path, out: Path) -> None:
    if out.exists():
        backup = out.with_name(out.name + ".reexport-old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup)
    else:
        staging.rename(out)


def requantize(shipped: Path, work: Path, out: Path, modes: tuple[str, ...]) -> None:
    """Re-make the UNet's ``modes`` variants of ``shipped`` into ``out`` (module docstring)."""
    from export import quantize as quant
    from export.build import tool_versions
    from export.calibrate import capture, read_prompts, select_prompts
    from export.components import component_specs, run_torch, wrap_for_export
    from export.rebuild_from_onnx import rebuild
    from export.sources import load_source

    old = json.loads((shipped / MANIFEST_NAME).read_text())
    if old.get("schema_version") != SCHEMA_VERSION:
        raise click.ClickException(f"{shipped} is schema {old.get('schema_version')}: re-export it first")
    cal_old = (old["export"].get("quantize") or {}).get("calibration") or {}
    seed = int(cal_old.get("seed", 0))
    prompts = select_prompts(read_prompts(), int(cal_old.get("prompts", 16)))
    # the torch reference of the parity check: the UNet rebuilt from the shipped ONNX
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    rebuilt_db = rebuild(shipped, src)
    loaded = load_source(str(src))
    spec = component_specs(loaded, old["tokenizer"]["max_length"])["unet"]
    feeds = spec.sample_inputs(spec.check_dims, seed=seed + 1)   # as export/build.py's parity check
    ref = run_torch(wrap_for_export(loaded, spec), spec, feeds)
    del loaded
    staging = out.with_name(out.name + ".reexport-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(shipped, staging)
    data = json.loads((staging / MANIFEST_NAME).read_text())
    cal = capture(staging, prompts, steps=int(cal_old.get("steps", 10)), backend="openvino", seed=seed,
                  progress=print)
    print(f"calibration: {cal.info['samples']} UNet inputs, guidance {cal.info['guidance']}")
    components = data["components"]
    before = {m: json.dumps(components["unet"]["variants"].get(m)) for m in modes}
    outcome = quant.add_variants(staging, components, modes=modes, formats=tuple(data["export"]["formats"]),
                                 calibration=cal, checks={"unet": quant.Check(feeds, ref)}, force=False,
                                 step=lambda comp, stage: _Step(f"[{comp}] {stage}"),
                                 info=lambda msg, comp=None: print(msg))
    assert all(before[m] != json.dumps(components["unet"]["variants"][m]) for m in modes)
    for mode in (m for m in modes if m in quant.FORMATS_OF_MODE):   # int8-7bit: the other components
        for name, comp in components.items():                        # get int8's OpenVINO files, as in an export
            src_var = comp["variants"].get("int8") or {}
            if name == "unet" or "openvino" not in src_var.get("files", {}):
                continue
            comp["variants"][mode] = {key: {"openvino": src_var[key]["openvino"]}
                                      for key in ("quantization", "files", "parity", "size")}
            comp["variants"][mode]["quantization"]["openvino"] = dict(src_var["quantization"]["openvino"], mode=mode)
            comp["variants"][mode]["precision"] = src_var["quantization"]["openvino"]["precision"]
    changed = sorted({p for m in modes for paths in components["unet"]["variants"][m]["files"].values()
                      for p in paths})
    for rel in changed:
        data["files"][rel] = file_record(staging, rel)
    data["validated"] = bool(data["validated"] and outcome.all_passed)
    data["export"]["quantize"]["calibration"] = dict(cal.info)
    if "requantize" in data["export"]:    # an earlier re-quantization's record is kept, oldest first
        data["export"].setdefault("requantize_earlier", []).append(data["export"].pop("requantize"))
    data["export"]["requantize"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modes": list(modes), "components": ["unet"], "tools": tool_versions(),
        "how": "scripts/reexport_default_model.py --requantize: the unet's variants re-made with the current "
               "recipe (export/quantize.py) from the shipped fp32 unet files (unchanged), calibrated at the "
               "model's default guidance; parity reference: the torch unet rebuilt from the shipped ONNX",
        "files": changed, "rebuilt_vs_shipped_psnr_db": round(rebuilt_db["unet"], 1),
    }
    write_manifest(staging, data)
    _into_place(staging, out)


def remeasure(folder: Path, out: Path) -> dict:
    """Re-measure the held-out figures of ``folder``'s quantized UNet variants (module
    docstring) into ``out``'s manifest (``out`` = ``folder``: in place; else a copy).
    Returns {variant: {format: held_out entry}}."""
    from export import quantize as quant
    from export.build import tool_versions
    from export.calibrate import capture, read_prompts, select_prompts

    data = json.loads((folder / MANIFEST_NAME).read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise click.ClickException(f"{folder} is schema {data.get('schema_version')}: re-export it first")
    if out != folder:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(folder, out)
    cal_old = (data["export"].get("quantize") or {}).get("calibration") or {}
    prompts = select_prompts(read_prompts(), int(cal_old.get("prompts", 16)))  # the held-out seed follows their count
    cal = capture(out, prompts, steps=int(cal_old.get("steps", 10)), backend="openvino",
                  seed=int(cal_old.get("seed", 0)), samples=1, resolution="model")
    held = cal.held_out
    unet = data["components"]["unet"]
    refs: dict = {}
    got: dict = {}
    for name, var in unet["variants"].items():
        if name == "fp32":
            continue
        for fmt, paths in var["files"].items():
            entry = var["parity"][fmt]
            ref_fmt, ref = quant.held_out_reference(out, unet["variants"]["fp32"]["files"], fmt, held, refs)
            outs = [o["out_sample"] for o in quant.run_many(fmt, out / paths[0], held)]
            quant.gate_on_held_out(entry, ref_fmt, ref, outs)
            got.setdefault(name, {})[fmt] = entry["held_out"]
            print(f"{name} {fmt}: pooled {entry['held_out']['psnr_db']:.1f} dB, worst call "
                  f"{entry['held_out']['psnr_db_worst_call']:.1f} dB, mean {entry['held_out']['psnr_db_mean']:.1f} dB "
                  f"over {entry['held_out']['points']} calls")
    data["validated"] = bool(data["validated"] and all(
        p["passed"] for c in data["components"].values() for v in c["variants"].values() for p in v["parity"].values()))
    data["export"]["remeasure"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tools": tool_versions(),
        "how": "scripts/reexport_default_model.py --remeasure: the unet variants' held-out figures taken again "
               "over every call of the held-out run (pooled PSNR, worst call, mean); no file but cpuflow.json "
               "changed",
        "held_out": {k: cal.info[k] for k in ("held_out_prompt", "held_out_width", "held_out_height",
                                              "held_out_calls", "guidance", "steps", "seed", "precision")},
    }
    write_manifest(out, data)
    return got


class _Step:
    """A step context for quant.add_variants: prints the stage and its time."""
    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        import time
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time
        print(f"{self.label}: {time.perf_counter() - self.t0:.1f} s")
        return False


@click.command()
@click.option("--work", type=click.Path(path_type=Path), required=True, help="scratch folder")
@click.option("--shipped", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=ROOT / "cpuflow" / "models" / "default")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: --shipped, in place")
@click.option("--requantize", "requant", multiple=True, type=click.Choice(["int8", "int8-7bit", "hybrid"]),
              help="re-make only the UNet's quantized variant MODE with the current recipe (schema 2 folders)")
@click.option("--remeasure", "remeasure_", is_flag=True,
              help="only re-measure the quantized UNet variants' held-out figures (no weights file changes)")
def main(work, shipped, out, requant, remeasure_):
    from export.build import ConsoleProgress, export_model
    from export.rebuild_from_onnx import rebuild
    from export.sources import load_source

    if remeasure_:
        remeasure(shipped, out or shipped)
        print(f"re-measured: {out or shipped}")
        return
    if requant:
        work.mkdir(parents=True, exist_ok=True)
        requantize(shipped, work, out or shipped, tuple(requant))
        print(f"re-quantized {', '.join(requant)}: {out or shipped}")
        return
    old = json.loads((shipped / MANIFEST_NAME).read_text())
    modes = tuple((old["export"].get("quantize") or {}).get("modes") or ())
    work.mkdir(parents=True, exist_ok=True)
    src, export = work / "src", work / "export"
    shutil.rmtree(src, ignore_errors=True)
    rebuilt_db = rebuild(shipped, src)
    kwargs = {"quantize": modes} if modes else {}
    export_model(load_source(str(src)), export, formats=tuple(old["export"]["formats"]),
                 progress=ConsoleProgress(), **kwargs)
    compose(shipped, export, out or shipped, rebuilt_db)
    print(f"re-exported to manifest schema {SCHEMA_VERSION}: {out or shipped}")


if __name__ == "__main__":
    main()
