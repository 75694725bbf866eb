"""LoRA files merged into the model before export (``cpuflow export --lora FILE[:SCALE]``).

A LoRA (Hu et al. 2021) adds ``scale * (alpha / rank) * B A`` to some weights
of the UNet and text encoder. The exported graphs hold plain weights, so the
LoRA is *fused* here, once, into the loaded torch modules; the runtime never
knows there was one (and pays nothing per step).

diffusers does the work (it knows the formats and their key names):
``StableDiffusionPipeline.load_lora_weights`` reads diffusers / peft files
(``unet.…lora_A.weight``, ``text_encoder.…``) and kohya files (``lora_unet_…``,
``lora_te_…`` with ``.alpha``), ``fuse_lora(lora_scale=SCALE)`` adds them to the
weights and ``unload_lora_weights`` removes the peft layers, leaving the fused
plain modules. It needs ``peft`` (in the export extra).

Files are read by content (safetensors only, no pickles) and checked before
the model is loaded, so a missing, damaged or non-LoRA file fails fast with
nothing written to OUT_DIR. Each merged LoRA is recorded in the manifest under
``source.loras``: file name, sha256, scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from cpuflow.errors import InvalidArgument, MissingDependency, SourceError
from cpuflow.manifest import sha256_file

from .safe_load import SAFETENSORS, read_safetensors_header, sniff

# substrings of tensor names that only LoRA files have (diffusers/peft, kohya, old diffusers)
_LORA_KEY_MARKS = ("lora_a", "lora_b", "lora_down", "lora_up", "lora.down", "lora.up", "lora_linear_layer")


@dataclass(frozen=True)
class LoraRequest:
    path: Path
    scale: float = 1.0


def parse_lora_arg(text: str) -> LoraRequest:
    """``FILE`` or ``FILE:SCALE`` (SCALE a float, default 1.0). A colon whose
    tail is no number stays part of the file name."""
    text = str(text)
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not path:
        raise InvalidArgument(f"--lora {text!r} names no file (use --lora FILE or --lora FILE:SCALE)")
    if not math.isfinite(scale):
        raise InvalidArgument(f"--lora {text!r}: the scale must be a finite number, got {scale}")
    return LoraRequest(Path(path), scale)


def check_lora_file(req: LoraRequest) -> int:
    """Refuse what is not a readable safetensors LoRA file, naming the file and
    the fix; returns the number of tensors. Reads the header only."""
    p = req.path
    if not p.exists():
        raise SourceError(f"LoRA file {p} does not exist",
                          hint="pass the path of a downloaded .safetensors LoRA file to --lora")
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        hint = (f"pass the file inside it, e.g. --lora {files[0]}" if files
                else "pass a .safetensors LoRA file to --lora")
        raise SourceError(f"LoRA path {p} is a folder, not a file", hint=hint)
    try:
        fmt = sniff(p)
    except SourceError as e:
        raise SourceError(f"LoRA file {p} cannot be used: {e.message}",
                          hint="pass a .safetensors LoRA file (diffusers/peft or kohya format)") from None
    if fmt != SAFETENSORS:
        raise SourceError(f"LoRA file {p} is a pickle, not safetensors; it was not loaded",
                          hint="use the .safetensors version of the LoRA")
    header, _ = read_safetensors_header(p)
    if not header:
        raise SourceError(f"LoRA file {p} holds no tensors", hint="pass a LoRA .safetensors file")
    if not any(mark in k.lower() for k in header for mark in _LORA_KEY_MARKS):
        sample = ", ".join(sorted(header)[:3])
        raise SourceError(f"{p} is not a LoRA file (no lora_A/lora_B or lora_down/lora_up tensors; "
                          f"it holds e.g. {sample})",
                          hint="a full checkpoint is a SOURCE, not a --lora; pass a LoRA .safetensors file")
    return len(header)


def preflight_loras(args: Iterable[str | LoraRequest]) -> list[LoraRequest]:
    """Parse and check every --lora before the (slow) model load."""
    reqs = [a if isinstance(a, LoraRequest) else parse_lora_arg(a) for a in args]
    for r in reqs:
        check_lora_file(r)
    return reqs


def _count_lora_layers(*modules: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sum(isinstance(m, BaseTunerLayer) for mod in modules if mod is not None for m in mod.modules())


def merge_loras(loaded: Any, loras: Iterable[str | LoraRequest],
                progress: Callable[[str], None] | None = None) -> list[dict]:
    """Fuse each LoRA (in order, at its scale) into ``loaded.unet`` and
    ``loaded.text_encoder`` (export.sources.LoadedSource), in place. Records
    them in ``loaded.source["loras"]`` (and returns the records)."""
    reqs = preflight_loras(loras)
    if not reqs:
        return []
    try:
        import peft  # noqa: F401
        from diffusers import StableDiffusionPipeline
        from safetensors.torch import load_file
    except ImportError as e:
        raise MissingDependency(f"--lora needs diffusers, safetensors and peft ({e.name} is missing): "
                                "pip install 'cpuflow[export]'") from None
    # A pipeline object around the loaded modules: load_lora_weights / fuse_lora
    # only touch its unet and text_encoder (no tokenizer or scheduler needed).
    pipe = StableDiffusionPipeline(vae=loaded.vae, text_encoder=loaded.text_encoder, tokenizer=None,
                                   unet=loaded.unet, scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    records = []
    for i, req in enumerate(reqs):
        name = f"cpuflow_lora_{i}"
        if progress:
            progress(f"merging LoRA {req.path.name} at scale {req.scale:g}")
        try:
            state_dict = load_file(str(req.path), device="cpu")
        except Exception as e:  # safetensors' own error types
            raise SourceError(f"LoRA file {req.path} cannot be read ({e})") from None
        try:
            pipe.load_lora_weights(state_dict, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
            _unload(pipe)
            raise SourceError(f"LoRA file {req.path} does not fit this model ({type(e).__name__}: {e})",
                              hint="use a LoRA made for this base model (SD 1.x LoRAs for SD 1.x, ...)") from None
        layers = _count_lora_layers(loaded.unet, loaded.text_encoder)
        if layers == 0:
            _unload(pipe)
            raise SourceError(f"LoRA file {req.path} matched no layer of this model's UNet or text encoder",
                              hint="use a LoRA made for this base model")
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=req.scale, adapter_names=[name])
        _unload(pipe)
        if _count_lora_layers(loaded.unet, loaded.text_encoder):  # must be plain modules again
            raise SourceError(f"LoRA {req.path} could not be fused into plain weights")
        rec = {"file": req.path.name, "sha256": sha256_file(req.path), "scale": float(req.scale),
               "layers": int(layers)}
        records.append(rec)
        if progress:
            progress(f"merged LoRA {req.path.name}: {layers} layers")
    loaded.unet.eval()
    loaded.text_encoder.eval()
    source = dict(loaded.source)
    source["loras"] = list(source.get("loras", [])) + [
        {k: r[k] for k in ("file", "sha256", "scale")} for r in records]
    loaded.source = source
    return records


def _unload(pipe: Any) -> None:
    """Remove the peft layers; weights fused before stay fused."""
    pipe.unload_lora_weights()
