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

TEXT_LENGTH = "text_length"   # the UNet's symbolic text dimension: 77 x chunks
COMPONENT_ORDER = ("text_encoder", "unet", "vae_decoder", "vae_encoder",
                   "taesd_decoder", "taesd_encoder",  # only with --taesd (export/taesd.py)
                   "depth_estimator")                 # only for depth-to-image models (export/depth.py)


# --- wrappers ----------------------------------------------------------------
class TextEncoderWrapper(torch.nn.Module):
    """inputs_embeds float32 [batch, 77, hidden] (token embeddings, before the
    position embeddings) [+ input_ids int64 [batch, 77] where a pooled output is
    read at the first eos] -> last_hidden_state [batch, 77, hidden] and
    hidden_states [batch, layers + 1, 77, hidden] (every layer's output, the
    embeddings first), with the final layer norm applied (``normed``: what SD 1.x
    clip skip reads, A1111's ``final_layer_norm(hidden_states[-N])``) or raw
    (SDXL, as diffusers' ``hidden_states[-(clip_skip + 2)]``), [+ text_embeds].

    Taking token embeddings instead of ids lets the runtime put textual-inversion
    vectors in without a re-export; the token-embedding table is saved beside the
    encoder (``token_embeddings.npy``). The CLIP model runs as transformers has
    it: a forward hook hands it ``inputs_embeds`` as its token-embedding output,
    so position embeddings, causal mask and pooling are transformers' own code.
    (SD 2.x checkpoints hold only the layers up to the penultimate one, so the
    last layer is right for both SD families.)"""

    def __init__(self, text_encoder: torch.nn.Module, *, normed: bool, pooled: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.normed, self.pooled = normed, pooled
        core = getattr(text_encoder, "text_model", text_encoder)
        self.core = getattr(core, "text_model", core)   # transformers 4.x: CLIPTextModel.text_model
        self.token_embedding = self.core.embeddings.token_embedding

    def forward(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor | None = None):
        if input_ids is None:
            input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.int64)
        handle = self.token_embedding.register_forward_hook(lambda _m, _i, _o: inputs_embeds)
        try:
            out = self.text_encoder(input_ids=input_ids, output_hidden_states=True)
        finally:
            handle.remove()
        hs = out.hidden_states
        if self.normed:
            hs = [self.core.final_layer_norm(h) for h in hs]
        stacked = torch.stack(list(hs), dim=1)
        if self.pooled:
            return out.hidden_states[-2], stacked, out.text_embeds
        return (out.last_hidden_state if self.normed else out.hidden_states[-2]), stacked


def token_embedding_table(text_encoder: torch.nn.Module) -> np.ndarray:
    core = getattr(text_encoder, "text_model", text_encoder)
    core = getattr(core, "text_model", core)
    return core.embeddings.token_embedding.weight.detach().float().cpu().numpy()


def save_token_embeddings(text_encoder: torch.nn.Module, path, weights: str = "fp32") -> dict[str, Any]:
    """Write the token-embedding table (vocab x hidden) as .npy (float16 with
    --weights fp16, storage only) and return its manifest entry."""
    from pathlib import Path as _P
    table = token_embedding_table(text_encoder)
    if weights == "fp16":
        table = table.astype(np.float16)
    path = _P(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, table, allow_pickle=False)
    return {"shape": list(table.shape), "dtype": str(table.dtype)}


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
    source_attr: str                     # LoadedSource attribute holding the torch module
    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[int, str]]
    trace_dims: dict[str, int]           # symbol -> size used to trace the export
    check_dims: dict[str, int]           # symbol -> size used by the parity gate (differs)
    config: dict[str, Any] = field(default_factory=dict)
    make_inputs: Callable[[dict[str, int], np.random.Generator], dict[str, np.ndarray]] | None = None
    # files written beside the model file (comp_dir, weights) -> config entries (the token-embedding table)
    side_files: Callable[[Any, str], dict[str, Any]] | None = None

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


TOKEN_EMBEDDINGS_FILE = "token_embeddings.npy"


def text_encoder_spec(text_encoder: Any, max_length: int, *, name: str = "text_encoder",
                      normed: bool = True, pooled: bool = False) -> ComponentSpec:
    """The text-encoder contract of manifest schema 2 (see TextEncoderWrapper).
    ``default_layer`` in the config is the layer the model uses by default
    (-1: last_hidden_state, SD; -2: the penultimate, SDXL); clip skip N reads
    ``hidden_states[default_layer - (N - 1)]``."""
    cfg = _cfg(text_encoder)
    hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    n_layers = int(cfg.num_hidden_layers)
    embeds = _spec("inputs_embeds", "float32", ["batch", max_length, hidden])
    ids = _spec("input_ids", "int64", ["batch", max_length])
    first = _spec("last_hidden_state" if normed else "penultimate_hidden_states", "float32",
                  ["batch", max_length, hidden])
    states = _spec("hidden_states", "float32", ["batch", n_layers + 1, max_length, hidden])
    inputs = [embeds, ids] if pooled else [embeds]
    outputs = [first, states]
    config = {"hidden_size": hidden, "vocab_size": vocab, "max_position_embeddings": int(cfg.max_position_embeddings),
              "num_hidden_layers": n_layers, "default_layer": -1 if normed else -2,
              "hidden_states": "final_layer_norm" if normed else "raw",
              "token_embeddings": {"path": f"{name}/{TOKEN_EMBEDDINGS_FILE}", "shape": [vocab, hidden]}}
    if not normed:
        config["hidden_states_layer"] = -2
    if pooled:
        proj = int(cfg.projection_dim)
        outputs.append(_spec("text_embeds", "float32", ["batch", proj]))
        config["projection_dim"] = proj
    table = text_encoder.get_input_embeddings().weight if hasattr(text_encoder, "get_input_embeddings") else None
    eos = int(getattr(cfg, "eos_token_id", vocab - 1) or vocab - 1)

    def make(dims, rng):
        b = dims["batch"]
        tok = rng.integers(0, vocab, size=(b, max_length), dtype=np.int64)
        if pooled:   # an eos somewhere, as a tokenizer puts it
            tok[:, rng.integers(1, max_length)] = min(eos, vocab - 1)
        if table is not None:
            emb = table.detach().float().cpu().numpy()[tok]
        else:
            emb = rng.standard_normal((b, max_length, hidden), dtype=np.float32)
        feeds = {"inputs_embeds": np.ascontiguousarray(emb, dtype=np.float32)}
        if pooled:
            feeds["input_ids"] = tok
        return feeds

    def wrap(te):
        return TextEncoderWrapper(te, normed=normed, pooled=pooled)

    spec = ComponentSpec(
        name=name, source_attr=name, wrap=wrap,
        inputs=inputs, outputs=outputs, dynamic_axes={s.name: _axes(s) for s in [*inputs, *outputs]},
        trace_dims={"batch": 1}, check_dims={"batch": 2},
        config=config, make_inputs=make,
    )
    spec.side_files = lambda comp_dir, weights: {"token_embeddings": {
        "path": f"{name}/{TOKEN_EMBEDDINGS_FILE}",
        **save_token_embeddings(text_encoder, comp_dir / TOKEN_EMBEDDINGS_FILE, weights)}}
    return spec


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
    # any number of 77-token chunks (long prompts): one compiled shape per length at run time
    ehs = _spec("encoder_hidden_states", "float32", ["batch", TEXT_LENGTH, cross])
    out = _spec("out_sample", "float32", ["batch", cout, "latent_height", "latent_width"])

    def make(dims, rng):
        b, h, w = dims["batch"], dims["latent_height"], dims["latent_width"]
        t = np.linspace(999.0, 1.0, b).astype(np.float32) if b > 1 else np.array([500.0], np.float32)
        return {
            "sample": rng.standard_normal((b, cin, h, w), dtype=np.float32),
            "timestep": t,
            "encoder_hidden_states": rng.standard_normal((b, dims.get(TEXT_LENGTH, max_length), cross),
                                                         dtype=np.float32),
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
        trace_dims={"batch": 1, "latent_height": up + max(1, up // 2), "latent_width": 2 * up,
                    TEXT_LENGTH: max_length},
        # validate at another batch, a multiple height, a non-multiple width and two text chunks
        check_dims={"batch": 2, "latent_height": 2 * up, "latent_width": 3 * up - 1, TEXT_LENGTH: 2 * max_length},
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
        **_depth_specs(loaded),
    }


def _depth_specs(loaded: Any) -> dict[str, ComponentSpec]:
    model = getattr(loaded, "depth_estimator", None)
    if model is None:
        return {}
    from .depth import COMPONENT, depth_estimator_spec
    return {COMPONENT: depth_estimator_spec(model, loaded.depth_preprocess)}


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
