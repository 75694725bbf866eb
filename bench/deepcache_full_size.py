"""DeepCache on full-size architectures: compute saved, and quality against full compute.

1. FLOPs (``--flops``): one UNet call (batch 2, classifier-free guidance) of the
   plain UNet against the DeepCache shallow branch (export/deep_cache.py,
   ``skips=2``: DeepCache's branch 0), counted by torch's FlopCounterMode on meta
   tensors (no weights, no compute: machine-independent). SD 1.5 and SD 2.1 at
   512x512, SDXL at 1024x1024. The speed-up bound for "full every N calls" is
   N / (1 + (N - 1) * shallow / full).
2. Quality and time (``--quality``): random full-size SD 1.5 weights (seed 0)
   in diffusers' StableDiffusionPipeline, the model's PNDM scheduler, guidance 7.5,
   whose UNet forward is DeepCache's uniform schedule over the same torch modules
   the exported graphs are gated against: PSNR of the decoded image against the
   plain UNet's (N = 1) for N = 2, 3, 5, and seconds per image.

    python bench/deepcache_full_size.py --flops --quality --size 256 --steps 10 \
        --tokenizer .cache/clip-tokenizers/sd1 --json bench/results/deepcache-full-size.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def count_flops(arch: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from export import deep_cache as dc
    from export.components import unet_spec
    from export.components_sdxl import unet_spec as sdxl_unet_spec

    cfg = json.loads((ROOT / "export" / "configs" / arch / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg).eval()
    plain = sdxl_unet_spec(unet, 77, 1280) if arch == "sdxl" else unet_spec(unet, 77)
    names = plain.input_names()
    size = 1024 if arch == "sdxl" else (768 if arch == "sd21-v" else 512)
    lat = size // 8
    cross = plain.inputs[2].shape[-1]
    feeds = {"sample": torch.randn(2, 4, lat, lat, device="meta"), "timestep": torch.ones(2, device="meta"),
             "encoder_hidden_states": torch.randn(2, 77, cross, device="meta")}
    if arch == "sdxl":
        feeds["text_embeds"] = torch.randn(2, 1280, device="meta")
        feeds["time_ids"] = torch.ones(2, 6, device="meta")
    args = [feeds[n] for n in names]
    full = dc.DeepCacheUNet(unet, names, dc.DEFAULT_SKIPS, shallow=False)
    shallow = dc.DeepCacheUNet(unet, names, dc.DEFAULT_SKIPS, shallow=True)
    out = {}
    with torch.no_grad():
        for what, fn in (("full", lambda: full(*args)), ("shallow", None)):
            with FlopCounterMode(display=False) as fc:
                if what == "full":
                    _, feature = fn()
                else:
                    shallow(*args, feature)
            out[what] = fc.get_total_flops()
    ratio = out["shallow"] / out["full"]
    return {"arch": arch, "size": size, "gflop_full": round(out["full"] / 1e9, 1),
            "gflop_shallow": round(out["shallow"] / 1e9, 1), "shallow_over_full": round(ratio, 4),
            "speedup_bound": {n: round(n / (1 + (n - 1) * ratio), 2) for n in (2, 3, 5)}}


def deep_cache_forward(pipe, every: int):
    """Replace ``pipe.unet.forward`` by DeepCache's uniform schedule over UNet calls."""
    from export import deep_cache as dc
    unet = pipe.unet
    names = ["sample", "timestep", "encoder_hidden_states"]
    full = dc.DeepCacheUNet(unet, names, dc.DEFAULT_SKIPS, shallow=False)
    shallow = dc.DeepCacheUNet(unet, names, dc.DEFAULT_SKIPS, shallow=True)
    state = {"calls": 0, "feature": None}

    def forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        import torch
        t = timestep.expand(sample.shape[0]).float() if torch.is_tensor(timestep) else \
            torch.full((sample.shape[0],), float(timestep))
        if state["calls"] % every == 0:
            out, state["feature"] = full(sample, t, encoder_hidden_states)
        else:
            out = shallow(sample, t, encoder_hidden_states, state["feature"])
        state["calls"] += 1
        return (out,)

    unet.forward = forward
    return state


def quality(size: int, steps: int, tokenizer: Path, everies: tuple[int, ...], prompt: str) -> list[dict]:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from export.sources import load_source
    from export.validate import figures

    torch.set_num_threads(2)
    loaded = load_source(None, arch="sd15", random_weights=True, seed=0, tokenizer=tokenizer)
    sched = PNDMScheduler.from_config({k: v for k, v in loaded.scheduler_config.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(vae=loaded.vae, text_encoder=loaded.text_encoder, unet=loaded.unet,
                                   tokenizer=CLIPTokenizer.from_pretrained(str(loaded.tokenizer_dir)),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain_forward = pipe.unet.forward
    rows, ref = [], None
    for every in (1, *everies):
        pipe.unet.forward = plain_forward
        state = deep_cache_forward(pipe, every) if every > 1 else None
        t0 = time.perf_counter()
        with torch.no_grad():
            img = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
        dt = time.perf_counter() - t0
        img = np.asarray(img, np.float64)
        if ref is None:
            ref = img
        row = {"deep_cache": every, "seconds": round(dt, 1),
               "psnr_db_vs_full": round(figures(ref, img)["psnr_db"], 2) if every > 1 else None,
               "unet_calls": state["calls"] if state else None}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


@click.command()
@click.option("--flops", is_flag=True)
@click.option("--quality", "do_quality", is_flag=True)
@click.option("--size", default=256)
@click.option("--steps", default=10)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=ROOT / ".cache/clip-tokenizers/sd1")
@click.option("--every", "everies", multiple=True, type=int, default=(2, 3, 5))
@click.option("--prompt", default="a photo of an astronaut riding a horse on mars")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(flops, do_quality, size, steps, tokenizer, everies, prompt, json_out):
    result = {}
    if flops:
        result["flops"] = [count_flops(a) for a in ("sd15", "sd21-base", "sdxl")]
        for r in result["flops"]:
            print(json.dumps(r), file=sys.stderr, flush=True)
    if do_quality:
        result["quality"] = {"arch": "sd15", "weights": "random, seed 0", "size": size, "steps": steps,
                             "sampler": "PNDM (the model's)", "guidance": 7.5, "torch_threads": 2,
                             "rows": quality(size, steps, tokenizer, everies, prompt)}
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
