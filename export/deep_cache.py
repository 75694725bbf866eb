"""DeepCache: two more UNet graphs, so the runtime can reuse the UNet's deep features.

DeepCache (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free",
CVPR 2024) observes that the deep part of a UNet (everything below one skip
connection) changes little between adjacent denoising steps. It runs the whole
UNet every N steps and caches the feature that the deep part hands to the up
path at that skip branch; on the steps between it runs only the shallow branch
(``conv_in``, the first down unit(s), the last up unit(s), ``conv_out``) and
feeds it the cached feature.

``cpuflow export ... --deep-cache`` adds, beside the plain ``unet``:

* ``unet_deepcache_full``: the plain UNet's inputs -> ``out_sample`` (the plain
  UNet's output; the gate holds it to the plain torch UNet) and ``deep_feature``;
* ``unet_deepcache_shallow``: the plain UNet's inputs (less
  ``encoder_hidden_states`` when the shallow branch has no cross-attention, as in
  SDXL) and ``deep_feature`` -> ``out_sample``; given the feature of the same
  call it equals the full output (checked in torch at export, then the exported
  graph against that torch module by the usual gate).

Where the cut is. diffusers' ``UNet2DConditionModel.forward`` collects skip
connections ``conv_in, down units...`` (a down unit: one resnet (+ its
transformer), or a downsampler) and the up path consumes them in reverse, one
per up unit (a resnet (+ transformer), the block's upsampler after its last).
Keeping the first ``skips`` skip connections in the shallow branch cuts the UNet
where the up unit that consumes skip ``skips - 1`` begins: ``deep_feature`` is
the hidden state entering that up unit, before its concatenation with the skip
(DeepCache's ``prv_f``). ``skips = 2`` is DeepCache's ``cache_layer_id=0,
cache_block_id=0`` (branch 0, the shallowest branch with a down unit, what its
SD 1.5 / SDXL examples use): shallow = conv_in, down block 0's first resnet
(+ transformer), the last up block's last two units. Cuts are limited to down
block 0 (``skips <= 1 + layers_per_block``), so the feature is at the latent
resolution and its shape uses the same symbols as the sample.

The units are walked here, not by calling diffusers' block ``forward`` (which
runs a whole block), with the same modules, arguments and order as diffusers
0.42's CrossAttnDownBlock2D / DownBlock2D / UNetMidBlock2DCrossAttn /
CrossAttnUpBlock2D / UpBlock2D; other block types (and FreeU) are refused. The
upsamplers always get the size of the skip they meet next (diffusers passes it
only for latent sizes that are not a multiple of the up factor; the values are
the same), so the graphs take any latent size, as the plain UNet's do.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from cpuflow.errors import ExportError, InvalidArgument
from cpuflow.manifest import TensorSpec

from .components import ComponentSpec, _axes, torch_inputs

FULL = "unet_deepcache_full"
SHALLOW = "unet_deepcache_shallow"
COMPONENTS = (FULL, SHALLOW)
FEATURE = "deep_feature"
DEFAULT_SKIPS = 2       # DeepCache branch 0: cache_layer_id=0, cache_block_id=0
NOT_QUANTIZED = "the DeepCache graphs stay fp32 (only the plain unet gets quantized variants)"
# torch shallow(feature of full) against torch full: the same arithmetic, so only
# summation-order noise; far below the export gate's 1e-3
CONSISTENCY_REL = 1e-5

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


def _check_supported(unet: Any, skips: int) -> None:
    cfg = unet.config
    kinds = [type(b).__name__ for b in unet.down_blocks] + [type(b).__name__ for b in unet.up_blocks]
    bad = [k for k in kinds if k not in _DOWN + _UP]
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in _MID:
        bad.append(type(unet.mid_block).__name__)
    if bad:
        raise InvalidArgument(f"--deep-cache supports UNets of {', '.join(_DOWN + _UP + _MID)} blocks; "
                              f"this one has {', '.join(sorted(set(bad)))}")
    if getattr(cfg, "class_embed_type", None) is not None or getattr(cfg, "num_class_embeds", None):
        raise InvalidArgument("--deep-cache does not support UNets with class embeddings")
    if getattr(cfg, "addition_embed_type", None) not in (None, "text_time"):
        raise InvalidArgument(f"--deep-cache does not support addition_embed_type {cfg.addition_embed_type!r}")
    if any(getattr(b, "s1", None) for b in unet.up_blocks):
        raise InvalidArgument("--deep-cache: disable FreeU before export")
    most = 1 + len(unet.down_blocks[0].resnets)
    if not 1 <= skips <= most:
        raise InvalidArgument(f"DeepCache skips must be between 1 and {most} for this UNet (a cut in down "
                              f"block 0), got {skips}")


class DeepCacheUNet(torch.nn.Module):
    """The UNet walked unit by unit: ``shallow=False`` returns (out_sample,
    deep_feature), ``shallow=True`` takes the feature as its last input and runs
    the shallow branch only. ``input_names``: the plain UNet contract's names
    (sample, timestep, encoder_hidden_states, [timestep_cond], [text_embeds,
    time_ids]), in the order the graph takes them."""

    def __init__(self, unet: Any, input_names: list[str], skips: int, shallow: bool):
        super().__init__()
        _check_supported(unet, skips)
        self.unet = unet
        self.input_names = list(input_names)
        self.skips = skips
        self.shallow = shallow
        self.down_units: list[tuple[str, Any, Any]] = []
        for block in unet.down_blocks:
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            self.down_units += [("resnet", r, a) for r, a in zip(block.resnets, attns)]
            self.down_units += [("downsample", d, None) for d in (block.downsamplers or [])]
        self.up_units: list[tuple[Any, Any, Any]] = []   # (resnet, attention, upsampler after it)
        for block in unet.up_blocks:
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            last = len(block.resnets) - 1
            self.up_units += [(r, a, block.upsamplers if i == last and block.upsamplers else None)
                              for i, (r, a) in enumerate(zip(block.resnets, attns))]
        if len(self.up_units) != 1 + len(self.down_units):
            raise ExportError(f"DeepCache: {len(self.up_units)} up units for {1 + len(self.down_units)} skips")
        self.entry = len(self.up_units) - skips     # the up unit the feature enters

    # -- facts ----------------------------------------------------------------
    def shallow_has_cross_attention(self) -> bool:
        down = [attn for _, _, attn in self.down_units[:self.skips - 1]]
        up = [attn for _, attn, _ in self.up_units[self.entry:]]
        return any(a is not None for a in down + up)

    def feature_channels(self) -> int:
        skip_channels = self.unet.conv_in.out_channels   # every skip of down block 0 has its width
        return int(self.up_units[self.entry][0].conv1.in_channels) - int(skip_channels)

    # -- forward --------------------------------------------------------------
    def _embeddings(self, x: dict[str, torch.Tensor]):
        """diffusers' UNet2DConditionModel.forward steps 0-2: the time (+ SDXL
        text_time) embedding, the encoder states, conv_in."""
        unet = self.unet
        sample = x["sample"]
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=x["timestep"]),
                                  x.get("timestep_cond"))
        added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "text_embeds" in x else None
        ehs = x.get("encoder_hidden_states")
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        if ehs is not None:
            ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        return emb, ehs, unet.conv_in(sample)

    @staticmethod
    def _transformer(attn, h, ehs):
        return h if attn is None else attn(h, encoder_hidden_states=ehs, return_dict=False)[0]

    def forward(self, *args: torch.Tensor):
        names = self.input_names + ([FEATURE] if self.shallow else [])
        x = dict(zip(names, args))
        emb, ehs, h = self._embeddings(x)
        skips = [h]
        for kind, module, attn in self.down_units[:self.skips - 1] if self.shallow else self.down_units:
            h = module(h) if kind == "downsample" else self._transformer(attn, module(h, emb), ehs)
            skips.append(h)
        if self.shallow:
            h, first = x[FEATURE], self.entry
        else:
            mid = self.unet.mid_block
            if mid is not None:
                h = mid(h, emb, encoder_hidden_states=ehs) if getattr(mid, "has_cross_attention", False) \
                    else mid(h, emb)
            first, feature = 0, None
        for i in range(first, len(self.up_units)):
            if i == self.entry and not self.shallow:
                feature = h
            resnet, attn, upsamplers = self.up_units[i]
            h = self._transformer(attn, resnet(torch.cat([h, skips.pop()], dim=1), emb), ehs)
            for up in upsamplers or []:
                h = up(h, skips[-1].shape[2:])
        unet = self.unet
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        out = unet.conv_out(h)
        return out if self.shallow else (out, feature)


def specs(unet: Any, plain: ComponentSpec, skips: int = DEFAULT_SKIPS) -> dict[str, ComponentSpec]:
    """The two component specs, built on the plain UNet's (SD, SDXL or LCM
    inputs alike). The shallow spec's inputs carry the feature that the torch
    full module computes from the same inputs (a weak reference: nothing keeps
    the UNet alive once the export releases it)."""
    names = plain.input_names()
    probe = DeepCacheUNet(unet, names, skips, shallow=True)   # checks support and the cut
    channels = probe.feature_channels()
    sample = plain.inputs[0]
    feature = TensorSpec(FEATURE, "float32", ("batch", channels, *sample.shape[2:]))
    cut = {"skips": skips, "branch": {"cache_layer_id": 0, "cache_block_id": skips - 2} if skips >= 2 else None,
           "feature": FEATURE, "feature_channels": channels, "up_unit": probe.entry,
           "up_units": len(probe.up_units), "reference": "DeepCache (Ma et al., CVPR 2024), uniform schedule"}
    config = dict(plain.config, deep_cache=cut)
    out = plain.outputs[0]
    unet_ref = weakref.ref(unet)

    def make_full(dims, rng):
        feeds = plain.make_inputs(dims, rng)
        check_full_equals_plain(unet_ref(), plain, feeds)
        return feeds

    full = ComponentSpec(
        name=FULL, source_attr=plain.source_attr,
        wrap=lambda m: DeepCacheUNet(m, names, skips, shallow=False),
        inputs=list(plain.inputs), outputs=[out, feature],
        dynamic_axes=dict(plain.dynamic_axes, **{FEATURE: _axes(feature)}),
        trace_dims=dict(plain.trace_dims), check_dims=dict(plain.check_dims),
        config=config, make_inputs=make_full)
    shallow_inputs = [s for s in plain.inputs
                      if s.name != "encoder_hidden_states" or probe.shallow_has_cross_attention()]
    used = [s.name for s in shallow_inputs]

    def make(dims, rng):
        feeds = plain.make_inputs(dims, rng)
        feeds[FEATURE] = consistent_feature(unet_ref(), names, skips, feeds)
        return {n: feeds[n] for n in used + [FEATURE]}

    shallow = ComponentSpec(
        name=SHALLOW, source_attr=plain.source_attr,
        wrap=lambda m: _NamedInputs(DeepCacheUNet(m, names, skips, shallow=True), names, used),
        inputs=shallow_inputs + [feature], outputs=[out],
        dynamic_axes={s.name: _axes(s) for s in shallow_inputs + [feature, out]},
        trace_dims=dict(plain.trace_dims), check_dims=dict(plain.check_dims),
        config=config, make_inputs=make)
    del probe
    return {FULL: full, SHALLOW: shallow}


class _NamedInputs(torch.nn.Module):
    """The shallow module with only the inputs its graph uses (SDXL's shallow
    branch has no cross-attention: no encoder_hidden_states input)."""

    def __init__(self, inner: DeepCacheUNet, all_names: list[str], used: list[str]):
        super().__init__()
        self.inner = inner
        self.all_names = all_names
        self.used = used

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x = dict(zip(self.used + [FEATURE], args))
        return self.inner(*[x.get(n) for n in self.all_names], x[FEATURE])


@torch.no_grad()
def consistent_feature(unet: Any, names: list[str], skips: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The full module's feature on ``feeds``, after checking in torch that the
    shallow module given it reproduces the full output (the decomposition is
    exact: same modules, same order), else ExportError."""
    full = DeepCacheUNet(_alive(unet), names, skips, shallow=False).eval()
    shallow = DeepCacheUNet(unet, names, skips, shallow=True).eval()
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
    out, feature = full(*args)
    _same("the shallow branch given the full call's feature", shallow(*args, feature), out)
    return feature.float().numpy()


@torch.no_grad()
def check_full_equals_plain(unet: Any, plain: ComponentSpec, feeds: dict[str, np.ndarray]) -> None:
    """The unit walk's main output against the plain wrapper (diffusers'
    UNet2DConditionModel.forward) on ``feeds``, in torch, else ExportError."""
    names = plain.input_names()
    args = torch_inputs(feeds, plain)
    want = plain.wrap(_alive(unet)).eval()(*args)
    got, _ = DeepCacheUNet(unet, names, 1, shallow=False).eval()(*args)
    _same("the full DeepCache walk's out_sample", got, want)


def _alive(unet: Any) -> Any:
    if unet is None:
        raise ExportError("DeepCache: the UNet was released before its DeepCache graphs were exported")
    return unet


def _same(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not rel <= CONSISTENCY_REL:
        raise ExportError(f"DeepCache: {what} differs from the plain UNet by {rel:.3g} (relative max), "
                          f"more than {CONSISTENCY_REL:g}: a bug in the cut", hint="report a bug")
