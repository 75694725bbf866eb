"""A loaded model folder: manifest, tokenizer and backend sessions.

Sessions are created lazily, one per (component, static shape), because a
static shape compiles to faster code than a dynamic one on OpenVINO; with the
compiled-model cache a second start does not pay the compile again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..backends.base import BackendOptions, Session, get_backend
from ..config import PRECISIONS, LoadConfig
from ..errors import CpuflowError, ModelError
from ..manifest import Manifest, load_manifest
from ..tokenizer import ClipTokenizer

FORMAT_OF_BACKEND = {"openvino": "openvino", "onnxruntime": "onnx"}

# The order in which variants are preferred when the user names none: the
# fastest first (see bench/README.md); fp32 is always present.
VARIANT_PREFERENCE = ("int8", "hybrid", "int8-weights", "fp32")

# diffusers scheduler class -> our sampler name: the model's own sampler is the default.
SAMPLER_OF_SCHEDULER = {
    "PNDMScheduler": "plms",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}


def shipped_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "default"


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


class LoadedModel:
    """Everything needed to run one exported folder on one backend."""

    def __init__(self, config: LoadConfig):
        self.config = config
        root = config.model if config.model is not None else shipped_model_dir()
        if config.model is None and not (root / "cpuflow.json").exists():
            raise ModelError("the default model is not installed with this copy of cpuflow",
                             hint="pass --model MODEL_DIR (an exported folder)")
        # All file checks happen here, before any backend session exists.
        self.manifest: Manifest = load_manifest(root, verify=config.verify)
        self.format = FORMAT_OF_BACKEND[config.backend]
        if self.format not in self.manifest.formats():
            have = ", ".join(sorted(self.manifest.formats())) or "none"
            other = [b for b, f in FORMAT_OF_BACKEND.items() if f in self.manifest.formats()]
            raise ModelError(f"{root} has no {self.format} files (it has: {have})",
                             hint=(f"use --backend {other[0]}" if other else "re-export the model")
                             + f" or re-export with --format {self.format}")
        tok_dir = self.manifest.path(self.manifest.tokenizer["path"])
        self.tokenizer = ClipTokenizer.from_dir(tok_dir)
        self.max_length = int(self.manifest.tokenizer.get("max_length", self.tokenizer.max_length))
        cache_dir = None
        if config.use_cache:
            from ..backends.cache import default_cache_dir
            cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.options = BackendOptions(device=config.device, precision=self._precision(config.precision),
                                      threads=config.threads, cache_dir=cache_dir)
        self.backend = get_backend(config.backend, self.options)
        self._sessions: dict[tuple, Session] = {}
        self.load_seconds = 0.0
        self.load_warnings: list[str] = []   # from sessions loaded since generate() last took them

    def _precision(self, asked: str) -> str:
        """``auto`` takes the model's own default precision when its manifest
        records one (the shipped 64x64 model: f32, as bf16 saves it ~0.02 s per
        image and guidance 5 amplifies bf16 rounding into wrong shapes); an explicit
        --precision always wins."""
        own = self.manifest.raw.get("defaults", {}).get("precision")
        if asked != "auto" or own is None:
            return asked
        if own not in PRECISIONS:
            raise ModelError(f"{self.manifest.root}: the manifest's default precision {own!r} is not one of "
                             f"{', '.join(PRECISIONS)}", hint="re-export the model or pass --precision")
        if own == "bf16" and self.config.backend != "openvino":
            return "auto"   # an OpenVINO hint; onnxruntime runs its own default
        return own

    # -- variants -------------------------------------------------------------
    def variant_of(self, component: str) -> str:
        comp = self.manifest.components[component]
        usable = [v for v, var in comp.variants.items() if self.format in var.files]
        if self.config.variant is not None:
            if self.config.variant in usable:
                return self.config.variant
            if self.config.variant not in {v for c in self.manifest.components.values() for v in c.variants}:
                all_v = sorted({v for c in self.manifest.components.values() for v in c.variants})
                raise ModelError(f"variant {self.config.variant!r} is not in this model (it has: {', '.join(all_v)})")
            return "fp32"  # this component has no such variant: it runs in fp32
        preferred = self.manifest.raw.get("defaults", {}).get("variant")
        if preferred in usable:
            return preferred   # the model's author chose (e.g. quality over speed for a tiny model)
        for v in VARIANT_PREFERENCE:
            if v in usable:
                return v
        return "fp32"

    # -- sessions -------------------------------------------------------------
    def session(self, component: str, dims: Mapping[str, int]) -> Session:
        if component not in self.manifest.components:
            raise ModelError(f"{self.manifest.root} has no {component}",
                             hint="re-export the model with a current cpuflow")
        key = (component, tuple(sorted(dims.items())))
        sess = self._sessions.get(key)
        if sess is None:
            comp = self.manifest.components[component]
            vname = self.variant_of(component)
            var = comp.variants[vname]
            t0 = time.perf_counter()
            sess = self.backend.load(
                component,
                self.manifest.path(var.model_file(self.format)),
                comp.inputs,
                comp.outputs,
                static_dims=dict(dims),
                cache_key=f"{self.manifest.model_hash}-{component}-{vname}",
            )
            self.load_seconds += time.perf_counter() - t0
            sess.variant = vname  # type: ignore[attr-defined]
            if getattr(sess.info, "warning", None):  # e.g. OpenVINO fell back to f32
                self.load_warnings.append(sess.info.warning)
            self._sessions[key] = sess
        return sess

    def release(self, component: str) -> None:
        """Free a component's sessions (low-memory mode: the text encoder after encoding)."""
        for key in [k for k in self._sessions if k[0] == component]:
            sess = self._sessions.pop(key)
            try:
                sess.close()
            except CpuflowError:
                pass

    def session_infos(self) -> dict[str, tuple]:
        """``{component: (SessionInfo, variant)}`` for the sessions loaded now
        (what a record says ran each component)."""
        return {name: (s.info, getattr(s, "variant", "fp32")) for (name, _), s in self._sessions.items()}

    def loaded_shapes(self, component: str) -> list[dict[str, int]]:
        """The static shapes ``component`` is loaded at now."""
        return [dict(dims) for (name, dims) in self._sessions if name == component]

    def take_load_warnings(self) -> list[str]:
        """Warnings from sessions loaded since the last call (each once)."""
        out = list(dict.fromkeys(self.load_warnings))
        self.load_warnings.clear()
        return out

    def close(self) -> None:
        for key in list(self._sessions):
            self.release(key[0])

    # -- facts ----------------------------------------------------------------
    def latent_dims(self, width: int, height: int, batch: int) -> dict[str, int]:
        d = self.manifest.downscale
        return {"batch": batch, "height": height, "width": width,
                "latent_height": height // d, "latent_width": width // d}

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this. The exporter traces the UNet
        with size-forwarding upsampling, so any latent size works and only the
        VAE's downscale matters."""
        return int(self.manifest.components["unet"].config.get("size_multiple", self.manifest.downscale))

    def default_sampler(self) -> str:
        return SAMPLER_OF_SCHEDULER.get(str(self.manifest.scheduler.get("_class_name", "")), "euler")

    def scheduler_config(self) -> dict:
        cfg = dict(self.manifest.scheduler)
        cfg["prediction_type"] = self.manifest.prediction_type
        return cfg

    def run(self, component: str, dims: Mapping[str, int], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session(component, dims).run(feeds)
