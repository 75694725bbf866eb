"""A loaded model folder: manifest, tokenizer and backend sessions.

Sessions are created lazily, one per (component, static shape), because a
static shape compiles to faster code than a dynamic one on OpenVINO; with the
compiled-model cache a second start does not pay the compile again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..backends.base import BackendOptions, Session, get_backend
from ..config import LoadConfig
from ..cpu import int8_dot_products_exact
from ..errors import CpuflowError, ModelError
from ..file_digests import DigestMemo
from ..manifest import Manifest, load_manifest
from ..tokenizer import ClipTokenizer
from ..variants import VariantChoice, choose_variant
from .session_cache import SessionCache

FORMAT_OF_BACKEND = {"openvino": "openvino", "onnxruntime": "onnx"}

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
        # All file checks happen here, before any backend session exists. Content is
        # checked by sha256, each file hashed once and remembered by its identity
        # (a same-size corruption changes its mtime/ctime, so it is hashed again).
        digests = DigestMemo.in_cache(config.cache_dir) if config.verify == "sha256" else None
        self.manifest: Manifest = load_manifest(root, verify=config.verify, digests=digests)
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
        self.options = self.backend_options(config, cache_dir)
        self.backend = get_backend(config.backend, self.options)
        # Which variant runs, and why (cpuflow/variants.py: by measured fidelity; fp32 on a GPU).
        # Without VNNI / AMX no variant with int8 activations is picked (cpuflow/cpu.py).
        self.variant_choice: VariantChoice = choose_variant(self.manifest, self.format, config.variant,
                                                            on_gpu=getattr(self.backend, "uses_gpu", False),
                                                            int8_exact=int8_dot_products_exact())
        # (component, dims) -> session, least recently used out first over the byte cap
        self._sessions = SessionCache(config.max_session_bytes)
        self.load_seconds = 0.0
        self.load_warnings: list[str] = []   # from sessions loaded since generate() last took them

    def backend_options(self, config: LoadConfig, cache_dir: Path | None) -> BackendOptions:
        """How the backend runs this model (--low-memory: OpenVINO pages out the mapped weights,
        ONNX Runtime runs without its CPU arena)."""
        return BackendOptions(device=config.device, precision=self._precision(config.precision),
                              threads=config.threads, cache_dir=cache_dir,
                              page_out_weights=bool(config.low_memory), cpu_arena=not config.low_memory)

    def _precision(self, asked: str) -> str:
        """``auto`` takes the model's own default precision when its manifest
        records one (the shipped 64x64 model: f32, as bf16 saves it ~0.02 s per
        image and guidance 5 amplifies bf16 rounding into wrong shapes); an explicit
        --precision always wins."""
        own = self.manifest.raw.get("defaults", {}).get("precision")
        if asked != "auto" or own is None:
            return asked
        if own == "bf16" and self.config.backend != "openvino":
            return "auto"   # an OpenVINO hint; onnxruntime runs its own default
        return own

    # -- variants -------------------------------------------------------------
    def variant_of(self, component: str) -> str:
        """The chosen variant, or fp32 for a component that has no such file."""
        comp = self.manifest.components[component]
        name = self.variant_choice.name
        var = comp.variants.get(name)
        return name if var is not None and self.format in var.files else "fp32"

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
            model_file = self.manifest.path(var.model_file(self.format))
            t0 = time.perf_counter()
            sess = self._sessions.load(key, lambda: self.backend.load(
                component,
                model_file,
                comp.inputs,
                comp.outputs,
                static_dims=dict(dims),
                cache_key=f"{self.manifest.model_hash}-{component}-{vname}",
            ), model_file)
            self.load_seconds += time.perf_counter() - t0
            sess.variant = vname  # type: ignore[attr-defined]
            if getattr(sess.info, "warning", None):  # e.g. OpenVINO fell back to f32
                self.load_warnings.append(sess.info.warning)
        return sess

    @property
    def session_cache(self) -> SessionCache:
        """The held sessions' cache, read-only use: its ``total_bytes``, ``cap_bytes``
        and ``evictions`` say what the byte cap does (callers never reach into it)."""
        return self._sessions

    def loaded_sessions(self) -> Iterator[tuple[str, dict[str, int], Session]]:
        """(component, static dims, session) of every session held now, least recently used first."""
        for (component, dims), sess in list(self._sessions.items()):
            yield component, dict(dims), sess

    def release(self, component: str) -> None:
        """Free a component's sessions (low-memory mode: the text encoder after encoding)."""
        self._sessions.drop(lambda key: key[0] == component)

    def session_infos(self) -> dict[str, tuple]:
        """``{component: (SessionInfo, variant)}`` for the sessions loaded now
        (what a record says ran each component)."""
        return {name: (s.info, getattr(s, "variant", "fp32")) for name, _, s in self.loaded_sessions()}

    def loaded_shapes(self, component: str) -> list[dict[str, int]]:
        """The static shapes ``component`` is loaded at now."""
        return [dims for name, dims, _ in self.loaded_sessions() if name == component]

    def take_load_warnings(self) -> list[str]:
        """Warnings from sessions loaded since the last call (each once)."""
        out = list(dict.fromkeys(self.load_warnings))
        self.load_warnings.clear()
        return out

    def close(self) -> None:
        self._sessions.drop(lambda key: True)

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
        sess = self.session(component, dims)
        return self._sessions.run((component, tuple(sorted(dims.items()))), lambda: sess.run(feeds))
