"""Peer engines as `cpuflow bench` references: OpenVINO GenAI and optimum-intel.

``--reference genai`` runs ``openvino_genai.Text2ImagePipeline`` and
``--reference optimum-intel`` runs optimum-intel's ``OVStableDiffusionPipeline``,
both on an optimum-intel OpenVINO folder given with ``--reference-source``
(``optimum-cli export openvino --task text-to-image``, or
``python -m cpuflow_export.optimum_layout`` for the same weights as a cpuflow
export). Both get static shapes (reshaped to the bench's size, batch and guidance
before compiling: optimum-intel's fastest setting, ~20% over dynamic shapes on
SD 1.5, ``../shared/anchors.md``), the bench's threads and precision hint.

Only the ``e2e`` (one whole image) and ``load`` (build + compile, a fresh process
each) stages exist for a peer: neither pipeline exposes a single UNet call the way
the other stages time it. The per-image breakdown comes from GenAI's own
performance metrics and from the same forward timers as the torch reference for
optimum-intel.

Everything here is checked before anything is measured (:func:`check_peer`): a
missing package or a folder a peer cannot read is one error line with the fix.
Nothing is imported at module import time but the standard library; GenAI is
imported inside its worker process only (it needs no torch). optimum-intel needs
torch and lives in the export stage (``export/bench_optimum.py``); it may run under
another interpreter (``--peer-python``): its version set cannot share a virtual
environment with this project's transformers and diffusers (bench/README.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, MissingDependency

PEERS = ("genai", "optimum-intel")
REFERENCES = ("torch",) + PEERS
PEER_STAGES = ("e2e", "load")
PEER_LABEL = {"genai": "OpenVINO GenAI Text2ImagePipeline", "optimum-intel": "optimum-intel OVStableDiffusionPipeline"}
FIX_GENAI = "python -m cpuflow_export.optimum_layout --fix-genai {folder}"
INSTALL = {"genai": "pip install 'cpuflow[peers]' (openvino-genai and openvino-tokenizers of your openvino version)",
           "optimum-intel": "optimum-intel 2.2 needs transformers < 5.6, huggingface-hub < 1.22 and a diffusers "
                            "older than this project's: install it in a virtual environment of its own and pass its "
                            "interpreter with --peer-python (bench/README.md, 'Peers')"}
# the diffusers scheduler classes GenAI 2026.4 implements (openvino_genai.Scheduler.Type); it refuses
# DPMSolverMultistepScheduler ("Unsupported value for 'scheduler'")
GENAI_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
                    "LMSDiscreteScheduler", "PNDMScheduler", "FlowMatchEulerDiscreteScheduler")
PRECISION_HINT = {"bf16": "bf16", "f32": "f32"}   # auto: OpenVINO's default (bf16 on AMX / AVX512-BF16 CPUs)


@dataclass(frozen=True)
class PeerRef:
    """One peer column: an engine on one optimum-intel folder at one precision hint."""

    engine: str                  # genai | optimum-intel
    source: str                  # the optimum-intel folder
    precision: str = "auto"
    python: str | None = None    # interpreter of the worker (None: this one)

    @property
    def id(self) -> str:
        return f"{self.engine}:{Path(self.source).name}/{self.precision}"


# ---------------------------------------------------------------- checks before measuring
def _has_module(name: str, python: str | None) -> bool:
    if python is None:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:      # a parent package that is missing or fails to import
            return False
    r = subprocess.run([python, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
    return r.returncode == 0


PEER_MODULE = {"genai": "openvino_genai", "optimum-intel": "optimum.intel.openvino"}


_IMPORTABLE: dict[tuple[str, str | None], bool] = {}   # one import check per process and interpreter


def check_installed(engine: str, python: str | None = None) -> None:
    """MissingDependency when ``engine``'s package cannot be imported (by ``python``:
    an import in a child process, which also catches a package that is installed but
    breaks on import, as optimum-intel beside a CUDA torchvision does)."""
    if engine not in PEERS:
        raise InvalidArgument(f"reference must be one of {', '.join(REFERENCES)}, got {engine!r}")
    if python is not None and not Path(python).is_file():
        raise InvalidArgument(f"--peer-python {python} is not a file")
    key = (PEER_MODULE[engine], python)
    if key not in _IMPORTABLE:
        _IMPORTABLE[key] = _has_module(*key)
    if not _IMPORTABLE[key]:
        where = f" by {python}" if python else ""
        raise MissingDependency(f"--reference {engine} needs {PEER_MODULE[engine].split('.')[0]}, which cannot be "
                                f"imported{where}", hint=INSTALL[engine])


def check_folder(engine: str, folder: str | os.PathLike | None) -> Path:
    """The optimum-intel folder ``engine`` will read, or InvalidArgument naming what is
    missing and the command that fixes it."""
    if folder is None:
        raise InvalidArgument(f"--reference {engine} needs an optimum-intel OpenVINO folder: --reference-source "
                              f"{engine}=FOLDER",
                              hint="make one with `python -m cpuflow_export.optimum_layout OUT --random-weights "
                                   "--arch sd15` (the same weights as `cpuflow export --random-weights --arch sd15`) "
                                   "or `optimum-cli export openvino --task text-to-image`")
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise InvalidArgument(f"--reference-source {folder}: no such folder")
    missing = [rel for rel in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/openvino_model.xml",
                               "unet/openvino_model.xml", "vae_decoder/openvino_model.xml") if not (p / rel).is_file()]
    if missing:
        raise InvalidArgument(f"{p} is not an optimum-intel OpenVINO folder: no {', '.join(missing)}",
                              hint="export one with `python -m cpuflow_export.optimum_layout` or "
                                   "`optimum-cli export openvino --task text-to-image`")
    try:
        index = json.loads((p / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{p}/model_index.json is not readable JSON ({e})") from None
    if "unet" not in index or "StableDiffusionXL" in str(index.get("_class_name", "")):
        raise InvalidArgument(f"{p} is not an SD 1.x / 2.x text-to-image folder (model_index.json: "
                              f"{index.get('_class_name')}); the peer references run StableDiffusionPipeline only")
    if engine == "genai":
        problems = []
        if not (p / "tokenizer" / "openvino_tokenizer.xml").is_file():
            problems.append("no tokenizer/openvino_tokenizer.xml")
        text = (p / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
        if any(bad in text for bad in ("Infinity", "NaN")):
            problems.append("scheduler_config.json holds -Infinity/NaN (DPM-Solver's lambda_min_clipped), which "
                            "GenAI's JSON reader rejects")
        fix = FIX_GENAI.format(folder=p)
        try:
            cls = str(json.loads(text).get("_class_name", ""))
        except ValueError:
            cls = ""
        if cls not in GENAI_SCHEDULERS:
            problems.append(f"GenAI has no {cls or 'scheduler named in scheduler_config.json'} (it has "
                            f"{', '.join(GENAI_SCHEDULERS)})")
            fix += " --scheduler EulerDiscreteScheduler"
        if problems:
            raise InvalidArgument(f"OpenVINO GenAI cannot read {p}: {'; '.join(problems)}",
                                  hint=f"run `{fix}` (needs the export extra and openvino-tokenizers)")
    return p.resolve()


def check_peer(ref: PeerRef) -> None:
    check_folder(ref.engine, ref.source)
    check_installed(ref.engine, ref.python)


def parse_sources(references: tuple[str, ...], sources: tuple[str, ...]) -> dict[str, list[str]]:
    """``--reference-source [NAME=]SOURCE`` (repeatable) -> {reference: [sources]}. A bare
    SOURCE belongs to the peers asked for (both read the same folder), else to torch;
    ``genai=A --reference-source genai=B``: two GenAI columns (e.g. fp32 and int8 folders)."""
    out: dict[str, list[str]] = {}
    peers = [r for r in references if r in PEERS]
    for item in sources:
        name, sep, rest = item.partition("=")
        if sep and name in REFERENCES:
            targets, src = [name], rest
        else:
            targets, src = (peers or ["torch"]), item
        for t in targets:
            if t not in references:
                raise InvalidArgument(f"--reference-source {item}: {t} is not among the --reference options given")
            out.setdefault(t, []).append(src)
    if len(out.get("torch", [])) > 1:
        raise InvalidArgument("one --reference-source for torch at most")
    return out


# ---------------------------------------------------------------- same weights
def _conv_in_weight(xml: Path):
    """The UNet's first convolution weight [C, latent channels, 3, 3] as stored in an IR:
    (dtype name, float32 array), or None when no plain float constant of that shape exists
    (weights compressed to int8 are stored with their scales: not comparable bit for bit)."""
    import numpy as np
    import openvino as ov

    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = tuple(int(d) for d in op.get_output_shape(0))
        if len(shape) == 4 and shape[1] in (4, 9) and shape[2:] == (3, 3):
            et = op.get_output_element_type(0).get_type_name()
            if et not in ("f32", "f16", "bf16"):
                return None
            return et, np.asarray(op.get_data()).astype(np.float32)
    return None


def check_same_unet(model_dir: str | os.PathLike, folder: str | os.PathLike) -> dict[str, Any]:
    """Compare the UNet's first convolution of a peer folder with the cpuflow model's fp32
    OpenVINO UNet (exactly; after rounding to fp16 when the peer stores fp16), so a peer column
    is never a different model. Raises ModelError on a mismatch; returns what was compared
    ({"unet.conv_in": True} or {"unet.conv_in": None, "why": ...} when it cannot be compared)."""
    import numpy as np

    from ..errors import ModelError
    from ..manifest import load_manifest

    m = load_manifest(model_dir, verify=False)
    var = m.components["unet"].variants.get("fp32")
    if var is None or "openvino" not in var.files:
        return {"unet.conv_in": None, "why": "the cpuflow model has no fp32 OpenVINO UNet"}
    ours = _conv_in_weight(m.path(var.model_file("openvino")))
    theirs = _conv_in_weight(Path(folder) / "unet" / "openvino_model.xml")
    if ours is None or theirs is None:
        return {"unet.conv_in": None, "why": "weights stored compressed (int8): not comparable exactly"}
    a, b = ours[1], theirs[1]
    if theirs[0] == "f16" and ours[0] != "f16":
        a = a.astype(np.float16).astype(np.float32)
    if a.shape != b.shape or not np.array_equal(a, b):
        raise ModelError(f"the peer folder {folder} holds another UNet than {model_dir} (conv_in differs): "
                         "the comparison would not be on the same weights",
                         hint="export both from the same source (python -m cpuflow_export.optimum_layout "
                              "... --random-weights --arch ARCH --seed SEED, as the cpuflow export)")
    return {"unet.conv_in": True}


# ---------------------------------------------------------------- the GenAI worker
def ov_properties(spec: dict) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if spec.get("threads"):
        props["INFERENCE_NUM_THREADS"] = int(spec["threads"])
    hint = PRECISION_HINT.get(spec.get("precision") or "auto")
    if hint:
        props["INFERENCE_PRECISION_HINT"] = hint
    return props


def resolved_precision(spec: dict) -> str:
    """What OpenVINO's CPU plugin computes in under the spec's hint (auto: its default)."""
    hint = PRECISION_HINT.get(spec.get("precision") or "auto")
    if hint:
        return hint
    import openvino as ov
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()   # bf16 | f32 | f16


def run_genai(spec: dict, progress) -> dict[str, Any]:
    """One GenAI measurement (stage e2e or load) in this worker process."""
    from .worker import measure, memory_status

    t_imp = time.perf_counter()
    import openvino_genai as ov_genai
    import_s = time.perf_counter() - t_imp

    w, h, g = int(spec["width"]), int(spec["height"]), float(spec["guidance"])
    before = memory_status()
    t0 = time.perf_counter()
    pipe = ov_genai.Text2ImagePipeline(str(spec["source"]))
    pipe.reshape(1, h, w, g)               # static shapes: batch 2 with guidance > 1
    pipe.compile("CPU", **ov_properties(spec))
    load_s = time.perf_counter() - t0
    progress("load", load_s)
    out: dict[str, Any] = {"load_s": load_s, "import_s": import_s, "rss_before_load_bytes": before["rss"],
                           "load_from": f"optimum-intel folder {spec['source']}"}
    stage = spec["stage"]
    if stage == "load":
        out.update(times_s=[load_s], warmup_times_s=[], rss_after_load_bytes=memory_status()["rss"],
                   run_peak_rss_bytes=None)
    elif stage == "e2e":
        def one_image():
            # an empty negative prompt as cpuflow's (GenAI refuses one without guidance)
            neg = {"negative_prompt": ""} if g > 1 else {}
            pipe.generate(spec["prompt"], width=w, height=h, num_inference_steps=int(spec["steps"]),
                          guidance_scale=g, rng_seed=int(spec.get("gen_seed", 0)), **neg)
            m = pipe.get_performance_metrics()   # milliseconds
            unet = m.get_unet_infer_duration().mean
            calls = len(m.raw_metrics.unet_inference_durations) if hasattr(m.raw_metrics,
                                                                          "unet_inference_durations") else None
            te = m.get_text_encoder_infer_duration()
            return {"text_encoder": round(sum(te.values()) / 1000, 6),
                    "unet": round(unet * calls / 1000, 6) if calls else None,
                    "unet_per_call": round(unet / 1000, 6),
                    "vae_decoder": round(m.get_vae_decoder_infer_duration() / 1000, 6)}

        breakdown: list[dict] = []
        out.update(measure(one_image, int(spec["warmup"]), int(spec["repeat"]), progress,
                           on_result=breakdown.append))
        out["breakdown"] = breakdown
        out["sampler"] = json.loads((Path(spec["source"]) / "scheduler" / "scheduler_config.json").read_text(
            encoding="utf-8")).get("_class_name")
    else:
        raise InvalidArgument(f"a peer reference measures the stages {', '.join(PEER_STAGES)}, not {stage!r}")
    out["peak_rss_bytes"] = memory_status()["hwm"]   # before the weights check reads anything
    if spec.get("check_weights") and spec.get("model"):
        out["weights_check"] = check_same_unet(spec["model"], spec["source"])
    out["sessions"] = {"pipeline": {"backend": "openvino-genai " + ov_genai.__version__.split("-")[0],
                                    "device": "CPU", "precision": resolved_precision(spec),
                                    "variant": "optimum IR, static shapes",
                                    "compile_s": None, "cached": False, "threads": spec.get("threads")}}
    return out


def run_peer(spec: dict, progress) -> dict[str, Any]:
    """The worker's entry for ``kind`` genai / optimum-intel."""
    if spec["kind"] == "genai":
        return run_genai(spec, progress)
    try:
        from cpuflow_export import bench_optimum  # installed package
    except ImportError:
        from export import bench_optimum  # a source checkout
    return bench_optimum.run_optimum(spec, progress)


def python_for(ref: PeerRef) -> str:
    return ref.python or sys.executable
