"""A diffusers SD 1.x/2.x model -> an optimum-intel OpenVINO folder, without optimum-intel.

``cpuflow bench --reference genai`` (OpenVINO GenAI ``Text2ImagePipeline``) and
``--reference optimum-intel`` (``OVStableDiffusionPipeline``) read the folder
layout that ``optimum-cli export openvino --task text-to-image`` writes::

    model_index.json
    scheduler/scheduler_config.json
    tokenizer/      vocab.json, merges.txt, ... + openvino_tokenizer.xml/.bin, openvino_detokenizer.xml/.bin
    text_encoder/   openvino_model.xml/.bin + config.json     input_ids i64 [B, T] -> last_hidden_state, pooler_output
    unet/           openvino_model.xml/.bin + config.json     sample [B, C, h, w], timestep i64 [B],
                                                              encoder_hidden_states [B, 77, D] -> out_sample
    vae_decoder/    openvino_model.xml/.bin + config.json     latent_sample [B, 4, h, w] -> sample  (post_quant_conv + decoder)
    vae_encoder/    openvino_model.xml/.bin + config.json     sample [B, 3, H, W] -> latent_parameters (encoder + quant_conv)

The port names, element types and which dimensions are dynamic are those of
optimum-intel 2.2's exporter (checked against a folder it wrote for the tiny test
model: tests/test_bench_peers.py). optimum-intel itself cannot be installed beside
this project's transformers / diffusers (bench/README.md, "Peers"), and exporting
the *same* weights as the cpuflow export (``--random-weights --arch sd15 --seed 0``)
is what a side-by-side latency comparison needs anyway.

GenAI also needs two things optimum-intel's folders do not always have
(``../shared/anchors.md``): ``tokenizer/openvino_tokenizer.xml`` (made here with
``openvino_tokenizers.convert_tokenizer``) and a scheduler config without
non-finite numbers (diffusers writes DPM-Solver's ``lambda_min_clipped = -inf`` as
``-Infinity``, which GenAI's JSON reader rejects). :func:`fix_for_genai` adds /
repairs both in an existing optimum-intel folder.

Usage::

    python -m cpuflow_export.optimum_layout OUT --random-weights --arch sd15 --tokenizer .cache/clip-tokenizers/sd1
    python -m cpuflow_export.optimum_layout OUT --source path/to/diffusers-folder
    python -m cpuflow_export.optimum_layout --fix-genai EXISTING_OPTIMUM_FOLDER
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from cpuflow.errors import ExportError, InvalidArgument
from cpuflow.manifest import TensorSpec

XML = "openvino_model.xml"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
ProgressFn = Callable[[str], None]


def finite_config(cfg: dict) -> tuple[dict, list[str]]:
    """(cfg without the keys holding a non-finite float, the removed keys). The only
    such key in diffusers' SD schedulers is DPM-Solver's ``lambda_min_clipped``
    (default ``-inf`` = no clipping), so dropping it keeps diffusers' meaning."""
    out, dropped = {}, []
    for k, v in cfg.items():
        if isinstance(v, float) and not math.isfinite(v):
            dropped.append(k)
        else:
            out[k] = v
    return out, dropped


def write_scheduler_config(cfg: dict, folder: Path) -> list[str]:
    path = folder / SCHEDULER_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    clean, dropped = finite_config(dict(cfg))
    path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return dropped


def write_openvino_tokenizer(tokenizer_dir: Path) -> list[Path]:
    """``openvino_tokenizer.xml`` + ``openvino_detokenizer.xml`` beside the Hugging Face
    tokenizer files in ``tokenizer_dir`` (openvino_tokenizers.convert_tokenizer)."""
    import openvino as ov
    from transformers import AutoTokenizer

    try:
        from openvino_tokenizers import convert_tokenizer
    except ImportError as e:
        raise ExportError("writing openvino_tokenizer.xml needs openvino-tokenizers",
                          hint="pip install 'cpuflow[peers]'") from e
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok, detok = convert_tokenizer(hf, with_detokenizer=True)
    out = [tokenizer_dir / TOKENIZER_XML, tokenizer_dir / DETOKENIZER_XML]
    ov.save_model(tok, str(out[0]))
    ov.save_model(detok, str(out[1]))
    return out


def fix_for_genai(folder: str | Path, scheduler: str | None = None) -> list[str]:
    """Make an optimum-intel folder readable by GenAI's Text2ImagePipeline: write the
    OpenVINO tokenizer when missing, drop non-finite scheduler values, and with
    ``scheduler`` switch the scheduler class (GenAI has no DPM-Solver: compare
    engines on one it has, e.g. EulerDiscreteScheduler; the betas stay). Returns what changed."""
    from cpuflow.bench.peers import GENAI_SCHEDULERS

    if scheduler is not None and scheduler not in GENAI_SCHEDULERS:
        raise InvalidArgument(f"GenAI has no {scheduler}; it has {', '.join(GENAI_SCHEDULERS)}")
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise InvalidArgument(f"{folder} is not an optimum-intel folder (no model_index.json)")
    sched = folder / SCHEDULER_CONFIG
    # Python's json reads -Infinity / NaN as floats
    cfg = json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else None
    target = scheduler or (cfg or {}).get("_class_name")
    if cfg is not None and target not in GENAI_SCHEDULERS:   # refused before anything is changed
        raise InvalidArgument(f"GenAI has no {target}: pass --scheduler with one of {', '.join(GENAI_SCHEDULERS)}")
    done = []
    if not (folder / "tokenizer" / TOKENIZER_XML).is_file():
        write_openvino_tokenizer(folder / "tokenizer")
        done.append(f"wrote tokenizer/{TOKENIZER_XML} and {DETOKENIZER_XML}")
    if cfg is not None:
        if cfg.get("_class_name") != target:
            done.append(f"scheduler {cfg.get('_class_name')} -> {target}")
            cfg["_class_name"] = target
        dropped = write_scheduler_config(cfg, folder)
        if dropped:
            done.append(f"dropped non-finite {', '.join(dropped)} from {SCHEDULER_CONFIG}")
    return done


# ------------------------------------------------------------------ the four models
class _TextEncoderIds(torch.nn.Module):
    """input_ids -> (last_hidden_state, pooler_output), as transformers' CLIPTextModel returns them."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def _spec(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
    """A ComponentSpec carrying only the ports (export/torch_to_openvino.py reads name,
    inputs, outputs and dynamic_axes; a str dimension is dynamic)."""
    from .components import ComponentSpec

    return ComponentSpec(name=name, source_attr=name, wrap=lambda m: m, inputs=inputs, outputs=outputs,
                         dynamic_axes={}, trace_dims={}, check_dims={})


def _models(loaded) -> list[tuple[str, Any, Any, tuple]]:
    """(folder, torch module, port spec, example inputs) per component, optimum-intel's ports."""
    from .components import UNetWrapper, VaeDecoderWrapper, VaeEncoderWrapper

    hidden = int(loaded.text_encoder.config.hidden_size)
    max_len = int(getattr(loaded.text_encoder.config, "max_position_embeddings", 77))
    lat_c = int(loaded.unet.config.in_channels)
    vae_lat = int(loaded.vae.config.latent_channels)
    down = 2 ** (len(loaded.vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.ones((1, max_len), dtype=torch.int64)
    f32, i64 = "float32", "int64"
    return [
        ("text_encoder", _TextEncoderIds(loaded.text_encoder),
         _spec("text_encoder", [TensorSpec("input_ids", i64, ("batch", "sequence"))],
               [TensorSpec("last_hidden_state", f32, ("batch", "sequence", hidden)),
                TensorSpec("pooler_output", f32, ("batch", hidden))]), (ids,)),
        ("unet", UNetWrapper(loaded.unet),
         _spec("unet", [TensorSpec("sample", f32, ("batch", lat_c, "h", "w")),
                        TensorSpec("timestep", i64, ("batch",)),
                        TensorSpec("encoder_hidden_states", f32, ("batch", max_len, hidden))],
               [TensorSpec("out_sample", f32, ("batch", lat_c, "h", "w"))]),
         (torch.randn((2, lat_c, 8, 8), generator=g), torch.tensor([500, 500], dtype=torch.int64),
          torch.randn((2, max_len, hidden), generator=g))),
        ("vae_decoder", VaeDecoderWrapper(loaded.vae),
         _spec("vae_decoder", [TensorSpec("latent_sample", f32, ("batch", vae_lat, "h", "w"))],
               [TensorSpec("sample", f32, ("batch", 3, "H", "W"))]),
         (torch.randn((1, vae_lat, 8, 8), generator=g),)),
        ("vae_encoder", VaeEncoderWrapper(loaded.vae),
         _spec("vae_encoder", [TensorSpec("sample", f32, ("batch", 3, "H", "W"))],
               [TensorSpec("latent_parameters", f32, ("batch", 2 * vae_lat, "h", "w"))]),
         (torch.randn((1, 3, 8 * down, 8 * down), generator=g),)),
    ]


def write_optimum_folder(loaded, out: str | Path, *, weights: str = "fp32", progress: ProgressFn | None = None,
                         tokenizer: bool = True) -> Path:
    """Write ``loaded`` (export.sources.LoadedSource of an SD 1.x/2.x txt2img model) as an
    optimum-intel OpenVINO folder in ``out`` (which must not exist or be empty).
    ``tokenizer=False`` skips the OpenVINO tokenizer (GenAI then cannot read the folder)."""
    import diffusers

    from .torch_to_openvino import convert_torch_to_openvino

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidArgument(f"{out} exists and is not empty")
    if getattr(loaded, "unet_kind", "txt2img") != "txt2img" or loaded.family not in ("sd1", "sd2"):
        raise InvalidArgument("the optimum-intel layout is written for SD 1.x / 2.x text-to-image models only")
    say = progress or (lambda _m: None)
    out.mkdir(parents=True, exist_ok=True)
    for name, module, spec, example in _models(loaded):
        say(f"converting {name}")
        convert_torch_to_openvino(module.eval(), spec, example, out / name, weights=weights)
    loaded.text_encoder.config.save_pretrained(str(out / "text_encoder"))
    loaded.unet.save_config(str(out / "unet"))
    loaded.vae.save_config(str(out / "vae_decoder"))
    loaded.vae.save_config(str(out / "vae_encoder"))
    shutil.copytree(loaded.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    if tokenizer:
        say("writing the OpenVINO tokenizer")
        write_openvino_tokenizer(out / "tokenizer")
    write_scheduler_config(loaded.scheduler_config, out)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None],
             "scheduler": ["diffusers", str(loaded.scheduler_config.get("_class_name", "PNDMScheduler"))],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "_cpuflow_source": dict(loaded.source)}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from cpuflow.cli_errors import exit_on_error

    ap = argparse.ArgumentParser(prog="python -m cpuflow_export.optimum_layout", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="the folder to write")
    ap.add_argument("--source", help="diffusers folder, single file or hub id")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--arch", help="with --random-weights: sd15, sd21, ...")
    ap.add_argument("--seed", type=int, default=0, help="with --random-weights (cpuflow export's default: 0)")
    ap.add_argument("--tokenizer", help="CLIP tokenizer folder (random weights, single files)")
    ap.add_argument("--fix-genai", metavar="FOLDER",
                    help="add openvino_tokenizer.xml and drop -Infinity from the scheduler config of an existing "
                         "optimum-intel folder, so that OpenVINO GenAI reads it")
    ap.add_argument("--scheduler", help="with --fix-genai: switch to this scheduler class (GenAI has no DPM-Solver)")
    a = ap.parse_args(argv)
    with exit_on_error("interrupted"):
        if a.fix_genai:
            changed = fix_for_genai(a.fix_genai, a.scheduler)
            print("\n".join(changed) or f"{a.fix_genai}: nothing to change")
            return 0
        if not a.out or bool(a.source) == bool(a.random_weights):
            raise InvalidArgument("pass OUT and either --source SOURCE or --random-weights --arch ARCH")
        from .sources import load_source

        loaded = load_source(a.source, random_weights=a.random_weights, arch=a.arch, seed=a.seed,
                             tokenizer=a.tokenizer)
        print(write_optimum_folder(loaded, a.out, progress=print))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
