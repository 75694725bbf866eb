"""The tiny autoencoder (diffusers ``AutoencoderTiny``: TAESD for SD 1.x/2.x,
TAESDXL for SDXL) as two extra components of an export.

``cpuflow export SOURCE OUT --taesd TAESD_SOURCE`` adds

* ``taesd_decoder``: ``latent_sample`` -> ``sample`` in about [-1, 1]; the input
  is the UNet's latents divided by the tiny autoencoder's own
  ``scaling_factor`` (1.0 for TAESD), exactly what diffusers'
  StableDiffusionPipeline passes to ``vae.decode`` when ``vae`` is an
  AutoencoderTiny;
* ``taesd_encoder``: ``sample`` in [-1, 1] -> ``latents`` (deterministic: no
  distribution to sample), which the runtime multiplies by ``scaling_factor``
  (diffusers' img2img does the same).

They go through the same ONNX / OpenVINO conversion and the same parity gate
as the other components. They are not quantized (1.2 M parameters per
half: int8 would save a few MB and cost accuracy); the manifest says so.

TAESD_SOURCE: a diffusers folder of an AutoencoderTiny (``config.json`` +
safetensors weights), a hub id (``madebyollin/taesd``, ``madebyollin/taesdxl``),
or ``random`` with ``--random-weights``: AutoencoderTiny's default config (the
TAESD architecture) with seeded random weights, for latency work.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cpuflow.errors import CpuflowError, InvalidArgument, MissingDependency, SourceError

from .components import ComponentSpec, _axes, _spec

TAESD_COMPONENTS = ("taesd_decoder", "taesd_encoder")
HUB_ALLOW = ["config.json", "diffusion_pytorch_model*.safetensors*"]
NOT_QUANTIZED = "the tiny autoencoder stays fp32 (1.2 M parameters per half for TAESD: int8 would gain little)"


# --- wrappers ----------------------------------------------------------------------
class TaesdDecoderWrapper(torch.nn.Module):
    """latent_sample (UNet latents / scaling_factor) -> sample in about [-1, 1]."""

    def __init__(self, taesd: torch.nn.Module):
        super().__init__()
        self.taesd = taesd

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.taesd.decode(latent_sample, return_dict=False)[0]


class TaesdEncoderWrapper(torch.nn.Module):
    """sample in [-1, 1] -> latents (before the scaling factor)."""

    def __init__(self, taesd: torch.nn.Module):
        super().__init__()
        self.taesd = taesd

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.taesd.encode(sample, return_dict=False)[0]


# --- facts and specs -------------------------------------------------------------------
def taesd_downscale(taesd: Any) -> int:
    """Pixels per latent: the encoder halves the size in every block but the
    first; the decoder upsamples by ``upsampling_scaling_factor`` in every block
    but the last."""
    cfg = taesd.config
    enc = 2 ** (len(cfg.encoder_block_out_channels) - 1)
    dec = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
    if enc != dec:
        raise SourceError(f"the tiny autoencoder's encoder downscales by {enc} but its decoder upscales by {dec}")
    return enc


def taesd_config(taesd: Any) -> dict[str, Any]:
    cfg = taesd.config
    return {"latent_channels": int(cfg.latent_channels),
            "downscale": taesd_downscale(taesd),
            "scaling_factor": float(cfg.scaling_factor),
            "shift_factor": float(getattr(cfg, "shift_factor", 0.0) or 0.0),
            "encoder_block_out_channels": list(cfg.encoder_block_out_channels),
            "decoder_block_out_channels": list(cfg.decoder_block_out_channels)}


def taesd_specs(taesd: Any) -> dict[str, ComponentSpec]:
    """The two component specs (empty without a tiny autoencoder)."""
    if taesd is None:
        return {}
    cfg = taesd.config
    c, cin, cout = int(cfg.latent_channels), int(cfg.in_channels), int(cfg.out_channels)
    down = taesd_downscale(taesd)
    config = taesd_config(taesd)

    dec_in = _spec("latent_sample", "float32", ["batch", c, "latent_height", "latent_width"])
    dec_out = _spec("sample", "float32", ["batch", cout, "height", "width"])

    def make_dec(dims, rng):
        return {"latent_sample": rng.standard_normal(
            (dims["batch"], c, dims["latent_height"], dims["latent_width"]), dtype=np.float32)}

    enc_in = _spec("sample", "float32", ["batch", cin, "height", "width"])
    enc_out = _spec("latents", "float32", ["batch", c, "latent_height", "latent_width"])

    def make_enc(dims, rng):
        return {"sample": rng.uniform(-1.0, 1.0, size=(dims["batch"], cin, dims["height"], dims["width"])
                                      ).astype(np.float32)}

    return {
        "taesd_decoder": ComponentSpec(
            name="taesd_decoder", source_attr="taesd", wrap=TaesdDecoderWrapper,
            inputs=[dec_in], outputs=[dec_out],
            dynamic_axes={dec_in.name: _axes(dec_in), dec_out.name: _axes(dec_out)},
            trace_dims={"batch": 1, "latent_height": 4, "latent_width": 6},
            check_dims={"batch": 2, "latent_height": 6, "latent_width": 5},
            config=dict(config), make_inputs=make_dec),
        "taesd_encoder": ComponentSpec(
            name="taesd_encoder", source_attr="taesd", wrap=TaesdEncoderWrapper,
            inputs=[enc_in], outputs=[enc_out],
            dynamic_axes={enc_in.name: _axes(enc_in), enc_out.name: _axes(enc_out)},
            trace_dims={"batch": 1, "height": 4 * down, "width": 6 * down},
            check_dims={"batch": 2, "height": 6 * down, "width": 5 * down},
            config=dict(config), make_inputs=make_enc),
    }


# --- loading -----------------------------------------------------------------------------
def _digest_files(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"):
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def _load_folder(folder: Path) -> Any:
    from diffusers import AutoencoderTiny

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        hint = ""
        if (folder / "model_index.json").is_file():
            hint = " (it is a whole pipeline: pass its AutoencoderTiny folder, or a hub id like madebyollin/taesd)"
        raise SourceError(f"--taesd {folder}: no config.json, not a diffusers AutoencoderTiny folder{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"--taesd {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderTiny":
        got = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise SourceError(f"--taesd {folder} holds a {got or 'non-diffusers'} model, not an AutoencoderTiny",
                          hint="pass a TAESD folder or hub id, e.g. madebyollin/taesd (SD 1.x/2.x) "
                               "or madebyollin/taesdxl (SDXL)")
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise SourceError(f"--taesd {folder} has no .safetensors weights (pickled .bin files are not loaded)")
    try:
        return AutoencoderTiny.from_pretrained(str(folder), use_safetensors=True, torch_dtype=torch.float32)
    except CpuflowError:
        raise
    except Exception as e:  # a damaged or mismatched file: one clear line
        raise SourceError(f"--taesd {folder}: could not load the AutoencoderTiny ({type(e).__name__}: {e})") from None


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise MissingDependency("downloading from the hub needs huggingface_hub: "
                                "pip install 'cpuflow[export]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW))
    except GatedRepoError:
        raise SourceError(f"could not download {repo_id}: the repository is gated; download it yourself and "
                          "pass the folder to --taesd") from None
    except RepositoryNotFoundError:
        raise SourceError(f"could not download {repo_id}: no such model on the Hugging Face hub (or it is "
                          "private); check the id, or pass a local AutoencoderTiny folder to --taesd") from None
    except Exception as e:
        raise SourceError(f"could not download {repo_id}: offline? download it yourself and pass the folder to "
                          f"--taesd ({type(e).__name__}; there is no local folder of that name either)") from None


def random_taesd(seed: int = 0, **config: Any) -> Any:
    """AutoencoderTiny with its default config (TAESD's architecture) unless
    ``config`` says otherwise, seeded random weights, float32, eval mode."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) * 1000 + 7)
        return AutoencoderTiny(**config).float().eval()


def load_taesd(source: str | Path, *, random_weights: bool = False, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> tuple[Any, dict]:
    """TAESD_SOURCE -> (AutoencoderTiny, {"kind", "name", "sha256"})."""
    from .sources import looks_like_hub_id

    say = progress or (lambda msg: None)
    text = str(source).strip()
    if text == "random":
        if not random_weights:
            raise InvalidArgument("--taesd random builds random weights: use it with --random-weights "
                                  "(or pass a TAESD folder or hub id, e.g. madebyollin/taesd)")
        # TAESD (SD 1.x/2.x) and TAESDXL (SDXL) are one architecture (madebyollin's taesd.py builds
        # both; 4 latent channels at 1/8 size, AutoencoderTiny's defaults): only the trained weights
        # differ, so random weights fit either family (attach_taesd checks channels and size).
        say(f"building the tiny autoencoder (TAESD / TAESDXL architecture) with random weights, seed {seed}")
        ident = hashlib.sha256(f"taesd-random-{int(seed)}".encode()).hexdigest()
        return random_taesd(seed), {"kind": "random", "name": "AutoencoderTiny default config (TAESD / TAESDXL)",
                                    "sha256": ident}
    if not text:
        raise InvalidArgument("--taesd needs a source: an AutoencoderTiny folder, a hub id "
                              "(madebyollin/taesd) or random (with --random-weights)")
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SourceError(f"--taesd {p} is a file; pass the AutoencoderTiny folder (config.json + safetensors)")
        say(f"reading the tiny autoencoder from {p}")
        return _load_folder(p).eval(), {"kind": "diffusers_folder", "name": p.resolve().name,
                                        "sha256": _digest_files(p)}
    if looks_like_hub_id(text):
        say(f"downloading the tiny autoencoder {text} from the Hugging Face hub (safetensors only)")
        folder = _hub_download(text)
        return _load_folder(folder).eval(), {"kind": "hub", "name": text, "sha256": _digest_files(folder)}
    raise SourceError(f"--taesd: no such folder: {p} (nor a hub id like madebyollin/taesd)")


def attach_taesd(loaded: Any, taesd: Any, info: dict) -> Any:
    """Attach a tiny autoencoder (from :func:`load_taesd`) to ``loaded`` (an
    export.sources.LoadedSource), after checking that it fits the model's
    latents (channels and downscale)."""
    vae_cfg = loaded.vae.config
    c, down = int(vae_cfg.latent_channels), 2 ** (len(vae_cfg.block_out_channels) - 1)
    tc, tdown = int(taesd.config.latent_channels), taesd_downscale(taesd)
    if (tc, tdown) != (c, down):
        raise SourceError(f"the tiny autoencoder makes {tc}-channel latents at 1/{tdown} size, the model uses "
                          f"{c} channels at 1/{down}: they do not fit",
                          hint="use madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL")
    loaded.taesd = taesd
    loaded.taesd_source = info
    return loaded


def manifest_entry(info: dict | None) -> dict | None:
    """What the manifest's ``export.taesd`` says (None: no tiny autoencoder)."""
    if info is None:
        return None
    return {"source": dict(info), "components": list(TAESD_COMPONENTS), "quantized": False,
            "note": NOT_QUANTIZED}
