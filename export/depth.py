"""The depth estimator of a depth-to-image model (stabilityai/stable-diffusion-2-depth).

diffusers' StableDiffusionDepth2ImgPipeline estimates depth with a DPT model
(transformers ``DPTForDepthEstimation``, folder ``depth_estimator/``) on pixels its
feature extractor (``feature_extractor/preprocessor_config.json``, a
``DPTImageProcessor``) made. The estimator is exported as one more component,
``depth_estimator``: ``pixel_values`` [batch, 3, H, W] -> ``predicted_depth``
[batch, H', W'] at the processor's fixed size, through the same parity gate as
the others. The runtime has no transformers, so the manifest records the
preprocessing as plain numbers (``depth.preprocess``), which cpuflow/depth_map.py
replays with PIL and numpy: resize to (height, width) with PIL filter
``resample``, times ``rescale_factor``, minus ``image_mean``, over ``image_std``.

Processor options the runtime does not replay (``keep_aspect_ratio``,
``ensure_multiple_of`` > 1, ``do_pad``) are refused at export with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpuflow.errors import CpuflowError, SourceError

from . import components as base

COMPONENT = "depth_estimator"
# DPTImageProcessor's defaults, for keys a preprocessor_config.json leaves out
PROCESSOR_DEFAULTS = {"do_resize": True, "size": {"height": 384, "width": 384}, "keep_aspect_ratio": False,
                      "ensure_multiple_of": 1, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                      "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                      "do_pad": False}


def preprocess_from_config(cfg: dict, where: str) -> dict:
    """The manifest's ``depth.preprocess`` from a DPT preprocessor config; SourceError for what
    the runtime cannot replay."""
    c = {**PROCESSOR_DEFAULTS, **{k: v for k, v in cfg.items() if k in PROCESSOR_DEFAULTS}}
    size = c["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not (isinstance(size, dict) and "height" in size and "width" in size):
        raise SourceError(f"{where}: the depth feature extractor's size {size!r} is not {{height, width}}")
    if not c["do_resize"] or c["keep_aspect_ratio"] or int(c["ensure_multiple_of"]) != 1 or c["do_pad"]:
        raise SourceError(f"{where}: the depth feature extractor resizes with keep_aspect_ratio / "
                          "ensure_multiple_of / do_pad (or not at all); cpuflow replays only a resize to a fixed "
                          "size (as stable-diffusion-2-depth's)")
    if int(c["resample"]) not in (0, 1, 2, 3, 4, 5):
        raise SourceError(f"{where}: unknown PIL resample filter {c['resample']!r}")
    return {"height": int(size["height"]), "width": int(size["width"]), "resample": int(c["resample"]),
            "rescale_factor": float(c["rescale_factor"]) if c["do_rescale"] else 1.0,
            "image_mean": [float(v) for v in c["image_mean"]] if c["do_normalize"] else [0.0, 0.0, 0.0],
            "image_std": [float(v) for v in c["image_std"]] if c["do_normalize"] else [1.0, 1.0, 1.0]}


def load_depth_estimator(folder: Path, allow_pickle: bool, progress) -> tuple[Any, dict, list[Path]]:
    """(DPTForDepthEstimation in float32 eval mode, the preprocess record, the files read)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from . import sources as src

    d, fe = folder / COMPONENT, folder / "feature_extractor" / "preprocessor_config.json"
    if not (d / "config.json").is_file():
        raise SourceError(f"{folder} is a depth-to-image model but has no {COMPONENT}/config.json "
                          "(the DPT depth estimator)")
    if not fe.is_file():
        raise SourceError(f"{folder} is a depth-to-image model but has no feature_extractor/preprocessor_config.json")
    cfg = src._read_json(d / "config.json", "depth estimator config")
    if cfg.get("model_type", "dpt") != "dpt":
        raise SourceError(f"{d}: the depth estimator is a {cfg.get('model_type')!r} model; expected DPT")
    preprocess = preprocess_from_config(src._read_json(fe, "depth feature extractor config"), str(fe))
    try:
        kwargs = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "dtype",
                                                                                       "torch_dtype")}
        with src._empty_weights():
            model = DPTForDepthEstimation(DPTConfig(**kwargs))
    except CpuflowError:
        raise
    except Exception as e:
        raise SourceError(f"cannot build the depth estimator from {d / 'config.json'}: {type(e).__name__}: {e}") \
            from None
    sd, files = src._read_component(folder, COMPONENT, allow_pickle, progress)
    model = src._load_strict(model, sd, COMPONENT, str(d))
    return model, preprocess, [d / "config.json", fe, *files]


class DepthEstimatorWrapper(torch.nn.Module):
    """pixel_values [batch, 3, H, W] (preprocessed) -> predicted_depth [batch, H', W']."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).predicted_depth


def depth_estimator_spec(model: Any, preprocess: dict) -> base.ComponentSpec:
    h, w = preprocess["height"], preprocess["width"]
    with torch.no_grad():   # the output size: DPT's head upsamples by a fixed factor
        oh, ow = model.float().eval()(pixel_values=torch.zeros(1, 3, h, w)).predicted_depth.shape[-2:]
    inp = base._spec("pixel_values", "float32", ["batch", 3, h, w])
    out = base._spec("predicted_depth", "float32", ["batch", int(oh), int(ow)])

    def make(dims, rng):
        return {"pixel_values": rng.uniform(-1.0, 1.0, size=(dims["batch"], 3, h, w)).astype(np.float32)}

    return base.ComponentSpec(
        name=COMPONENT, source_attr=COMPONENT, wrap=DepthEstimatorWrapper, inputs=[inp], outputs=[out],
        dynamic_axes={inp.name: base._axes(inp), out.name: base._axes(out)},
        trace_dims={"batch": 1}, check_dims={"batch": 2},
        config={"model_type": "dpt", "hidden_size": int(model.config.hidden_size),
                "num_hidden_layers": int(model.config.num_hidden_layers)},
        make_inputs=make)


def manifest_entry(loaded: Any) -> dict | None:
    pre = getattr(loaded, "depth_preprocess", None)
    return None if pre is None else {"preprocess": dict(pre)}
