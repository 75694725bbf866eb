"""The manifest: the contract between the export stage and the runtime.

``MODEL_DIR/cpuflow.json`` is written last (atomically) by ``cpuflow export``
and says everything the runtime needs; the runtime re-derives nothing. A value
the runtime needs and the manifest lacks is an export bug, reported as a
:class:`~cpuflow.errors.ManifestError` that says to re-export.

Schema version 1 (a JSON object)::

    format            "cpuflow-model"
    schema_version    2 (1 is still read: see SCHEMA_VERSION)
    complete          true            (false/absent: an export that never finished)
    name              human name
    family            "sd1" | "sd2" | "sdxl" | "x4-upscaler"
    prediction_type   "epsilon" | "v_prediction"
    random_weights    bool            (true: latency work only, images are noise)
    validated         bool            (false: exported with --force past a failed parity gate)
    scheduler         the model's diffusers scheduler config (dict, as in scheduler_config.json)
    latent            {channels, downscale, scaling_factor, shift_factor}
    unet_kind         optional (absent: "txt2img"): what the UNet's sample input holds, with C the latent
                      channels: "txt2img" C; "inpaint" 2C+1 (latents, mask, masked-image latents, in that
                      order, as diffusers' StableDiffusionInpaintPipeline concatenates them); "depth"
                      C+1 (latents, the normalised depth map: StableDiffusionDepth2ImgPipeline)
    depth             depth models: {preprocess: {height, width, resample (PIL filter), rescale_factor,
                      image_mean, image_std}}: what the depth_estimator component's pixel_values are
    default_size      {width, height}
    tokenizer         {path, files, max_length, bos_token_id, eos_token_id, pad_token_id}
    components        name -> Component (text_encoder, unet, vae_decoder, vae_encoder; optional
                      taesd_decoder, taesd_encoder: the tiny autoencoder, config.scaling_factor its own;
                      unet_deepcache_full, unet_deepcache_shallow: DeepCache, both or neither, their
                      config.deep_cache the cut: the full one also outputs deep_feature, the shallow one
                      takes it; older runtimes ignore them)
    files             relative path -> {size, sha256}   (every file of the folder but the manifest)
    source            {kind, name, sha256}
    export            {created, tools: {name: version}, formats, weights_dtype, forced}
    defaults          optional: the model's own generation defaults {steps, guidance, variant,
                      precision} (precision: what --precision auto means for this model)
    tokenizer_2       SDXL only (family "sdxl"): the second tokenizer, as ``tokenizer``
    sdxl              SDXL only: {force_zeros_for_empty_prompt, requires_aesthetics_score,
                      aesthetic_score, negative_aesthetic_score}; components then also hold
                      text_encoder_2, the text encoders output penultimate_hidden_states
                      (+ text_embeds) and the unet takes text_embeds and time_ids
    upscaler          x4 upscaler only (family "x4-upscaler"): {low_res_scheduler (the DDPM config
                      that noises the low-res image), max_noise_level, default_noise_level,
                      image_channels (3), factor (4)}; its unet's sample has latent + image
                      channels and it takes class_labels (the noise level); no vae_encoder

A Component::

    inputs / outputs  [{name, dtype, shape}]   shape entries are ints or symbols
                                               ("batch", "height", "width", "latent_height", ...)
    config            small facts (e.g. hidden_size, cross_attention_dim, in_channels)
    variants          name -> {precision, quantization, files: {format: [paths]}, parity: {format: {...}}}
                      "fp32" is always present; quantized variants sit beside it.
                      parity[format]: the export's figures against fp32 (psnr_db, passed, gate); a
                      calibrated UNet variant adds held_out {psnr_db pooled over every call of a
                      held-out sampling run, psnr_db_worst_call, psnr_db_mean, points = calls}
                      (older exports: psnr_db = the worst of 3 calls, no psnr_db_worst_call).
                      cpuflow/variants.py reads them to choose the default variant.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import IncompatibleModelError, IntegrityError, ManifestError, UnsafeFileError
from .file_digests import DigestMemo, sha256_file
from .manifest_values import check_values

MANIFEST_NAME = "cpuflow.json"
FORMAT = "cpuflow-model"
# 2: text encoders take token embeddings (inputs_embeds; the table beside them in
# token_embeddings.npy) and give every layer's hidden_states (clip skip); the
# unet's text length is symbolic ("text_length": 77 x prompt chunks). Folders of
# schema 1 still run: plain and weighted prompts of one chunk.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
COMPONENT_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "text_encoder_2",  # SDXL's second
                   "taesd_decoder", "taesd_encoder",  # optional: the tiny autoencoder (export --taesd)
                   "depth_estimator",                 # depth-to-image models: the DPT depth estimator
                   "unet_deepcache_full", "unet_deepcache_shallow")  # optional: DeepCache (export --deep-cache)
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
UPSCALER_FAMILY = "x4-upscaler"
UPSCALER_KEYS = ("low_res_scheduler", "max_noise_level", "image_channels", "factor")
FORMATS = ("onnx", "openvino")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

_REEXPORT = "re-export the model with `cpuflow export`"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape with symbolic dims taken from ``dims``."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in dims:
                out.append(int(dims[d]))
            else:
                raise ManifestError(f"tensor {self.name!r}: no value for dimension {d!r}")
        return tuple(out)


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    quantization: Mapping[str, Any] | None
    files: Mapping[str, tuple[str, ...]]  # format -> relative paths (model file first)
    parity: Mapping[str, Any]

    def model_file(self, fmt: str) -> str:
        return self.files[fmt][0]


@dataclass(frozen=True)
class Component:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: Mapping[str, Any]
    variants: Mapping[str, Variant]

    def input(self, name: str) -> TensorSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise ManifestError(f"component {self.name!r} has no input {name!r}")

    def output(self, name: str) -> TensorSpec:
        for s in self.outputs:
            if s.name == name:
                return s
        raise ManifestError(f"component {self.name!r} has no output {name!r}")


@dataclass(frozen=True)
class Manifest:
    root: Path
    raw: Mapping[str, Any] = field(repr=False)
    name: str
    family: str
    prediction_type: str
    random_weights: bool
    validated: bool
    scheduler: Mapping[str, Any]
    latent_channels: int
    downscale: int
    scaling_factor: float
    shift_factor: float | None
    default_width: int
    default_height: int
    tokenizer: Mapping[str, Any]
    components: Mapping[str, Component]
    files: Mapping[str, Mapping[str, Any]]

    @property
    def unet_kind(self) -> str:
        return str(self.raw.get("unet_kind", "txt2img"))

    @property
    def model_hash(self) -> str:
        """A short, stable id of the weights: sha256 over the sorted file hashes."""
        h = hashlib.sha256()
        for path in sorted(self.files):
            h.update(path.encode())
            h.update(str(self.files[path]["sha256"]).encode())
        return h.hexdigest()[:12]

    @property
    def a1111_hash(self) -> str | None:
        """AUTOMATIC1111's "Model hash" of the source checkpoint (the first 10 hex
        digits of the file's sha256, its new-style short hash) when the export read
        a single file; None for folders, hub ids and random weights (no such file)."""
        src = self.raw.get("source") or {}
        sha = str(src.get("sha256") or "")
        if src.get("kind") != "single_file" or len(sha) != 64:
            return None
        return sha[:10].lower()

    def path(self, rel: str) -> Path:
        return safe_join(self.root, rel)

    def formats(self) -> set[str]:
        out: set[str] = set()
        for comp in self.components.values():
            for var in comp.variants.values():
                out.update(var.files)
        return out


# --- reading -------------------------------------------------------------------
def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ManifestError(f"manifest {where} lacks {key!r}", hint=_REEXPORT)
    return d[key]


def safe_join(root: Path, rel: str) -> Path:
    """Join ``rel`` under ``root``, refusing anything that leaves the folder
    (``..``, absolute paths, symlinks pointing outside)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise UnsafeFileError(f"file path {rel!r} in the model folder is not a plain relative path")
    parts = Path(rel).parts
    if any(p in ("..", "") for p in parts):
        raise UnsafeFileError(f"file path {rel!r} leaves the model folder")
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root / rel))
    if target != root_real and root_real not in target.parents:
        raise UnsafeFileError(f"file {rel!r} resolves outside the model folder (symlink?)")
    return root / rel


def _parse_component(name: str, d: Mapping[str, Any]) -> Component:
    where = f"component {name!r}"
    variants = {}
    for vname, v in _req(d, "variants", where).items():
        files = {fmt: tuple(paths) for fmt, paths in _req(v, "files", f"{where} variant {vname!r}").items()}
        for fmt, paths in files.items():
            if fmt not in FORMATS or not paths:
                raise ManifestError(f"{where} variant {vname!r}: bad format entry {fmt!r}", hint=_REEXPORT)
        variants[vname] = Variant(
            name=vname,
            precision=str(v.get("precision", "fp32")),
            quantization=v.get("quantization"),
            files=files,
            parity=v.get("parity", {}),
        )
    if "fp32" not in variants:
        raise ManifestError(f"{where} has no fp32 variant", hint=_REEXPORT)
    return Component(
        name=name,
        inputs=tuple(TensorSpec.from_json(x) for x in _req(d, "inputs", where)),
        outputs=tuple(TensorSpec.from_json(x) for x in _req(d, "outputs", where)),
        config=d.get("config", {}),
        variants=variants,
    )


def parse_manifest(root: Path, data: Mapping[str, Any]) -> Manifest:
    root = Path(root)
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ManifestError(f"{root / MANIFEST_NAME} is not a cpuflow manifest", hint=_REEXPORT)
    version = data.get("schema_version")
    if version not in READABLE_SCHEMAS:
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ManifestError(
                f"model folder {root} uses manifest schema {version}, this cpuflow reads {SCHEMA_VERSION}",
                hint="upgrade cpuflow (pip install -U cpuflow) or re-export with this version",
            )
        raise ManifestError(f"model folder {root}: unknown manifest schema {version!r}", hint=_REEXPORT)
    if data.get("complete") is not True:
        raise ManifestError(f"model folder {root}: the export that wrote it did not finish", hint=_REEXPORT)
    check_values(root / MANIFEST_NAME, data)  # every number the runtime reads: type and range, key named
    latent = _req(data, "latent", "root")
    size = _req(data, "default_size", "root")
    comps_raw = _req(data, "components", "root")
    for needed in REQUIRED_COMPONENTS:
        if needed not in comps_raw:
            raise ManifestError(f"model folder {root} has no {needed}", hint=_REEXPORT)
    components = {n: _parse_component(n, c) for n, c in comps_raw.items() if n in COMPONENT_NAMES}
    pred = _req(data, "prediction_type", "root")
    if pred not in ("epsilon", "v_prediction"):
        raise ManifestError(f"unsupported prediction_type {pred!r}", hint=_REEXPORT)
    m = Manifest(
        root=root,
        raw=data,
        name=str(data.get("name", root.name)),
        family=str(_req(data, "family", "root")),
        prediction_type=pred,
        random_weights=bool(data.get("random_weights", False)),
        validated=bool(data.get("validated", False)),
        scheduler=_req(data, "scheduler", "root"),
        latent_channels=int(_req(latent, "channels", "latent")),
        downscale=int(_req(latent, "downscale", "latent")),
        scaling_factor=float(_req(latent, "scaling_factor", "latent")),
        shift_factor=(None if latent.get("shift_factor") is None else float(latent["shift_factor"])),
        default_width=int(_req(size, "width", "default_size")),
        default_height=int(_req(size, "height", "default_size")),
        tokenizer=_req(data, "tokenizer", "root"),
        components=components,
        files=_req(data, "files", "root"),
    )
    check_compatible(m)
    return m


def check_compatible(m: Manifest) -> None:
    """Refuse components that don't fit together, naming both sides and values."""
    unet = m.components["unet"]
    ehs = unet.input("encoder_hidden_states")
    if m.family == "sdxl":  # two text encoders, concatenated (cpuflow/pipelines/sdxl.py)
        if "text_encoder_2" not in m.components or "tokenizer_2" not in m.raw:
            raise ManifestError(f"SDXL model folder {m.root} has no text_encoder_2 / tokenizer_2", hint=_REEXPORT)
        widths = [m.components[n].output("penultimate_hidden_states").shape[-1]
                  for n in ("text_encoder", "text_encoder_2")]
        if sum(widths) != ehs.shape[-1]:
            raise IncompatibleModelError(f"text encoder widths {widths[0]} + {widths[1]} do not match unet "
                                         f"cross-attention width {ehs.shape[-1]}")
    else:
        te = m.components["text_encoder"].output("last_hidden_state")
        if te.shape[-1] != ehs.shape[-1]:
            raise IncompatibleModelError(
                f"text_encoder width {te.shape[-1]} does not match unet cross-attention width {ehs.shape[-1]}"
            )
    sample = unet.input("sample")
    c = m.latent_channels
    extra = 0
    if m.family == UPSCALER_FAMILY:  # latents + the low-res image (cpuflow/pipelines/upscale.py)
        up = m.raw.get("upscaler")
        if not isinstance(up, Mapping) or any(k not in up for k in UPSCALER_KEYS):
            raise ManifestError(f"x4 upscaler folder {m.root} lacks the upscaler block "
                                f"({', '.join(UPSCALER_KEYS)})", hint=_REEXPORT)
        extra = int(up["image_channels"])
        if "class_labels" not in {s.name for s in unet.inputs}:
            raise ManifestError(f"x4 upscaler folder {m.root}: its unet takes no class_labels", hint=_REEXPORT)
    wants = {"txt2img": c + extra, "inpaint": 2 * c + 1, "depth": c + 1}
    if m.unet_kind not in wants:
        raise ManifestError(f"model folder {m.root}: unknown unet_kind {m.unet_kind!r} "
                            f"(this cpuflow knows {', '.join(wants)})", hint="upgrade cpuflow or re-export")
    if sample.shape[1] != wants[m.unet_kind]:
        raise IncompatibleModelError(
            f"unet takes {sample.shape[1]} input channels but a {m.unet_kind} unet over {c} latent channels "
            + (f"and a low-res image of {extra} " if extra else "") + f"takes {wants[m.unet_kind]}"
        )
    if unet.output("out_sample").shape[1] != c:
        raise IncompatibleModelError(
            f"unet makes {unet.output('out_sample').shape[1]} channels but latent.channels is {c}")
    dec = m.components["vae_decoder"].input("latent_sample")
    if dec.shape[1] != m.latent_channels:
        raise IncompatibleModelError(
            f"vae_decoder takes {dec.shape[1]} latent channels but unet makes {m.latent_channels}"
        )
    deep = [n for n in ("unet_deepcache_full", "unet_deepcache_shallow") if n in m.components]
    if len(deep) == 1:
        raise ManifestError(f"model folder {m.root} has {deep[0]} without its other DeepCache graph", hint=_REEXPORT)
    if deep:
        made = m.components["unet_deepcache_full"].output("deep_feature").shape
        taken = m.components["unet_deepcache_shallow"].input("deep_feature").shape
        if list(made) != list(taken):
            raise IncompatibleModelError(f"unet_deepcache_full makes deep_feature {list(made)} but "
                                         f"unet_deepcache_shallow takes {list(taken)}")
    if "taesd_decoder" in m.components:
        tiny = m.components["taesd_decoder"].input("latent_sample")
        if tiny.shape[1] != m.latent_channels:
            raise IncompatibleModelError(
                f"taesd_decoder takes {tiny.shape[1]} latent channels but unet makes {m.latent_channels}"
            )


def load_manifest(root: str | os.PathLike, *, verify: bool | str = "size",
                  digests: DigestMemo | None = None) -> Manifest:
    """Read and check ``root/cpuflow.json``.

    ``verify``: ``"size"`` checks every file exists with the recorded size and is
    no git-lfs pointer (cheap); ``"sha256"`` (or True) also checks each file's
    sha256, taken from ``digests`` (a :class:`~cpuflow.file_digests.DigestMemo`:
    a file is hashed once, then again only when it changes) or, without one,
    hashed now; ``False`` skips file checks. All checks happen before any
    backend session is created, so a damaged folder never reaches a backend.
    """
    root = Path(root)
    if not root.exists():
        raise ManifestError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder; pass the folder that `cpuflow export` wrote")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}: not an exported model, or the export did not finish",
                            hint=_REEXPORT)
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{mpath} is not valid JSON ({e})", hint=_REEXPORT) from None
    try:
        m = parse_manifest(root, data)
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{mpath} is malformed ({type(e).__name__}: {e})", hint=_REEXPORT) from None
    if verify:
        verify_files(m, hashes=(verify == "sha256" or verify is True), digests=digests)
    return m


def verify_files(m: Manifest, *, hashes: bool, only: set[str] | None = None,
                 digests: DigestMemo | None = None) -> None:
    """Check each recorded file: inside the folder, present, right size, no
    git-lfs pointer, and (``hashes``) the right sha256 (from ``digests`` when given)."""
    for rel, info in m.files.items():
        if only is not None and rel not in only:
            continue
        p = m.path(rel)
        if not p.is_file():
            raise IntegrityError(f"model file {rel} is missing from {m.root}", hint=_REEXPORT)
        size = p.stat().st_size
        if size != int(info["size"]):
            with open(p, "rb") as f:
                head = f.read(len(LFS_POINTER_PREFIX))
            if head == LFS_POINTER_PREFIX:
                raise IntegrityError(f"model file {rel} is a git-lfs pointer, not the data",
                                     hint="run `git lfs pull` or " + _REEXPORT)
            raise IntegrityError(f"model file {rel} has {size} bytes, the manifest says {info['size']} "
                                 "(truncated or replaced)", hint=_REEXPORT)
        if hashes and (digests.sha256(p) if digests is not None else sha256_file(p)) != info["sha256"]:
            raise IntegrityError(f"model file {rel} does not match its sha256 (corrupted)", hint=_REEXPORT)
    # every file a component variant names must be recorded
    for comp in m.components.values():
        for var in comp.variants.values():
            for paths in var.files.values():
                for rel in paths:
                    if rel not in m.files:
                        raise ManifestError(f"component {comp.name} names {rel}, which the manifest does not record",
                                            hint=_REEXPORT)
    if digests is not None:
        digests.save()


# --- writing (used by the export stage) ----------------------------------------
def file_record(root: Path, rel: str) -> dict:
    p = root / rel
    return {"size": p.stat().st_size, "sha256": sha256_file(p)}


def record_all_files(root: Path) -> dict[str, dict]:
    """size + sha256 of every file under ``root`` except the manifest itself."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"):
            rel = p.relative_to(root).as_posix()
            out[rel] = file_record(root, rel)
    return out


def write_manifest(root: Path, data: Mapping[str, Any]) -> Path:
    """Write ``cpuflow.json`` atomically (temp file, fsync, rename) after checking
    that it parses as a complete manifest."""
    data = dict(data)
    data.setdefault("format", FORMAT)
    data.setdefault("schema_version", SCHEMA_VERSION)
    data["complete"] = True
    parse_manifest(Path(root), data)  # refuse to write what the runtime would refuse
    tmp = Path(root) / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    final = Path(root) / MANIFEST_NAME
    os.replace(tmp, final)
    return final
