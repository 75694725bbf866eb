"""One torch wrapper module per exported component, with a fixed signature.

The input and output names below are the contract with the runtime (they end
up in the ONNX / OpenVINO files and in the manifest); change them only together
with the runtime. Each :class:`ComponentSpec` knows

* how to wrap the source's torch module so that ``forward`` takes exactly the
  contract's inputs (positional, in order) and returns exactly its output;
* the I/O specs for the manifest (ints for fixed dims, symbols for dynamic ones);
* the shapes used to *trace* the export and, different on purpose, the shapes
  used to *validate* it: a dimension that the trace baked in as a constant shows
  up as a parity failure (or a shape error) in the gate instead of in a user's run;
* the small config facts the runtime may want.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from cpuflow.manifest import TensorSpec

COMPONENT_ORDER = ("text_encoder", "unet", "vae_decoder", "vae_encoder",
                   "taesd_decoder", "taesd_encoder")  # the last two only with --taesd (export/taesd.py)


# --- wrappers ----------------------------------------------------------------
class TextEncoderWrapper(torch.nn.Module):
    """input_ids int64 [batch, 77] -> last_hidden_state [batch, 77, hidden].

    The CLIPTextModel "as configured": SD 2.x checkpoints already hold only the
    layers up to the penultimate one, so last_hidden_state is right for both."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class UNetWrapper(torch.nn.Module):
    """(sample, timestep [batch] float32, encoder_hidden_states) -> out_sample."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    """latent_sample (already divided by the scaling factor) -> sample in about [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        # decode() = post_quant_conv (when the config uses it) + decoder
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """sample in [-1, 1] -> latent_parameters: DiagonalGaussian mean and logvar
    concatenated on dim 1 (encoder + quant_conv, exactly what diffusers'
    ``AutoencoderKL._encode`` returns); the runtime samples and scales."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        h = self.encoder(sample)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h


# --- specs ---------------------------------------------------------------------
@dataclass
class ComponentSpec:
    name: str
    source_attr: str                     # LoadedModel attribute holding the torch module
    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[int, str]]
    trace_dims: dict[str, int]           # symbol -> size used to trace the export
    check_dims: dict[str, int]           # symbol -> size used by the parity gate (differs)
    config: dict[str, Any] = field(default_factory=dict)
    make_inputs: Callable[[dict[str, int], np.random.Generator], dict[str, np.ndarray]] | None = None

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        assert self.make_inputs is not None
        return self.make_inputs(dims, np.random.default_rng(seed))

    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def spec_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs],
                "config": dict(self.config)}


def _axes(spec: TensorSpec) -> dict[int, str]:
    return {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}


def _spec(name: str, dtype: str, shape: list) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def _cfg(module: Any) -> Any:
    return getattr(module, "config")


def _unet_up_factor(unet: Any) -> int:
    n = getattr(unet, "num_upsamplers", None)
    if n is None:
        n = len(_cfg(unet).block_out_channels) - 1
    return 2 ** int(n)


def _vae_downscale(vae: Any) -> int:
    return 2 ** (len(_cfg(vae).block_out_channels) - 1)


def text_encoder_spec(text_encoder: Any, max_length: int) -> ComponentSpec:
    cfg = _cfg(text_encoder)
    hidden = int(cfg.hidden_size)
    vocab = int(cfg.vocab_size)
    inp = _spec("input_ids", "int64", ["batch", max_length])
    out = _spec("last_hidden_state", "float32", ["batch", max_length, hidden])

    def make(dims, rng):
        b = dims["batch"]
        ids = rng.integers(0, vocab, size=(b, max_length), dtype=np.int64)
        return {"input_ids": ids}

    return ComponentSpec(
        name="text_encoder", source_attr="text_encoder", wrap=TextEncoderWrapper,
        inputs=[inp], outputs=[out], dynamic_axes={inp.name: _axes(inp), out.name: _axes(out)},
        trace_dims={"batch": 1}, check_dims={"batch": 2},
        config={"hidden_size": hidden, "vocab_size": vocab,
                "max_position_embeddings": int(cfg.max_position_embeddings),
                "num_hidden_layers": int(cfg.num_hidden_layers)},
        make_inputs=make,
    )


def unet_spec(unet: Any, max_length: int) -> ComponentSpec:
    cfg = _cfg(unet)
    cin, cout = int(cfg.in_channels), int(cfg.out_channels)
    cross = cfg.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    cross = int(cross)
    up = _unet_up_factor(unet)
    sample = _spec("sample", "float32", ["batch", cin, "latent_height", "latent_width"])
    timestep = _spec("timestep", "float32", ["batch"])
    ehs = _spec("encoder_hidden_states", "float32", ["batch", max_length, cross])
    out = _spec("out_sample", "float32", ["batch", cout, "latent_height", "latent_width"])

    def make(dims, rng):
        b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
        t = np.linspace(999.0, 1.0, b).astype(np.float32) if b > 1 else np.array([500.0], np.float32)
        return {
            "sample": rng.standard_normal((b, cin, h, w), dtype=np.float32),
            "timestep": t,
            "encoder_hidden_states": rng.standard_normal((b, max_length, cross), dtype=np.float32),
        }

    config = {"in_channels": cin, "out_channels": cout, "cross_attention_dim": cross,
              "sample_size": cfg.sample_size, "block_out_channels": list(cfg.block_out_channels),
              "upsample_factor": up}
    spec = ComponentSpec(
        name="unet", source_attr="unet", wrap=UNetWrapper,
        inputs=[sample, timestep, ehs], outputs=[out],
        dynamic_axes={s.name: _axes(s) for s in (sample, timestep, ehs, out)},
        # Trace at a latent size that is NOT a multiple of the UNet's overall
        # upsampling factor: diffusers then passes each skip connection's size to
        # the upsamplers (interpolate(size=...)), and the traced graph takes any
        # latent size (e.g. 520x520 images, latent 65). Traced at a multiple, the
        # graph would bake in scale_factor=2 and fail on such sizes.
        trace_dims={"batch": 1, "latent_height": up + max(1, up // 2), "latent_width": 2 * up},
        # validate at another batch, a multiple height and a non-multiple width
        check_dims={"batch": 2, "latent_height": 2 * up, "latent_width": 3 * up - 1},
        config=config, make_inputs=make,
    )
    if getattr(cfg, "time_cond_proj_dim", None) is not None:  # LCM: guidance as an input
        from .guidance_unet import add_guidance_embedding_input
        add_guidance_embedding_input(spec, int(cfg.time_cond_proj_dim))
    return spec


def vae_decoder_spec(vae: Any) -> ComponentSpec:
    cfg = _cfg(vae)
    c = int(cfg.latent_channels)
    cout = int(cfg.out_channels)
    inp = _spec("latent_sample", "float32", ["batch", c, "latent_height", "latent_width"])
    out = _spec("sample", "float32", ["batch", cout, "height", "width"])

    def make(dims, rng):
        return {"latent_sample": rng.standard_normal(
            (dims["batch"], c, dims["latent_height"], dims["latent_width"]), dtype=np.float32)}

    return ComponentSpec(
        name="vae_decoder", source_attr="vae", wrap=VaeDecoderWrapper,
        inputs=[inp], outputs=[out], dynamic_axes={inp.name: _axes(inp), out.name: _axes(out)},
        trace_dims={"batch": 1, "latent_height": 4, "latent_width": 6},
        check_dims={"batch": 2, "latent_height": 6, "latent_width": 5},
        config=_vae_config(vae), make_inputs=make,
    )


def vae_encoder_spec(vae: Any) -> ComponentSpec:
    cfg = _cfg(vae)
    c = int(cfg.latent_channels)
    cin = int(cfg.in_channels)
    down = _vae_downscale(vae)
    inp = _spec("sample", "float32", ["batch", cin, "height", "width"])
    out = _spec("latent_parameters", "float32", ["batch", 2 * c, "latent_height", "latent_width"])

    def make(dims, rng):
        return {"sample": rng.uniform(-1.0, 1.0, size=(dims["batch"], cin, dims["height"], dims["width"])
                                      ).astype(np.float32)}

    return ComponentSpec(
        name="vae_encoder", source_attr="vae", wrap=VaeEncoderWrapper,
        inputs=[inp], outputs=[out], dynamic_axes={inp.name: _axes(inp), out.name: _axes(out)},
        trace_dims={"batch": 1, "height": 4 * down, "width": 6 * down},
        check_dims={"batch": 2, "height": 6 * down, "width": 5 * down},
        config=_vae_config(vae), make_inputs=make,
    )


def _vae_config(vae: Any) -> dict[str, Any]:
    cfg = _cfg(vae)
    return {"block_out_channels": list(cfg.block_out_channels),
            "latent_channels": int(cfg.latent_channels),
            "downscale": _vae_downscale(vae),
            "scaling_factor": float(cfg.scaling_factor)}


def component_specs(loaded: Any, max_length: int) -> dict[str, ComponentSpec]:
    """All component specs of a loaded model, in export order (five for SDXL, three for the x4
    upscaler: export/components_upscale.py; the tiny
    autoencoder's two more when one is attached: export/taesd.py)."""
    from .taesd import taesd_specs
    if getattr(loaded, "family", None) == "sdxl":
        from .components_sdxl import component_specs as sdxl_specs
        return {**sdxl_specs(loaded, max_length), **taesd_specs(getattr(loaded, "taesd", None))}
    if getattr(loaded, "family", None) == "x4-upscaler":
        from .components_upscale import component_specs as upscale_specs
        return upscale_specs(loaded, max_length)
    return {
        "text_encoder": text_encoder_spec(loaded.text_encoder, max_length),
        "unet": unet_spec(loaded.unet, max_length),
        "vae_decoder": vae_decoder_spec(loaded.vae),
        "vae_encoder": vae_encoder_spec(loaded.vae),
        **taesd_specs(getattr(loaded, "taesd", None)),
    }


def torch_inputs(feeds: dict[str, np.ndarray], spec: ComponentSpec) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names())


@torch.no_grad()
def run_torch(module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 torch reference for ``feeds``."""
    out = module(*torch_inputs(feeds, spec))
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {n: t.detach().float().cpu().numpy() for n, t in zip(spec.output_names(), out)}


def wrap_for_export(loaded: Any, spec: ComponentSpec) -> torch.nn.Module:
    module = getattr(loaded, spec.source_attr)
    if module is None:
        raise ValueError(f"{spec.source_attr} was already released")
    return spec.wrap(module.float()).eval()
