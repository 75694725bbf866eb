"""`cpuflow upscale`: the x4 upscaler from the command line (cpuflow/pipelines/upscale.py),
and the helper behind `cpuflow generate --upscale DIR`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_options import load_options, sampling_options

EXAMPLES_UPSCALE = """
\b
Examples:
  cpuflow export stabilityai/stable-diffusion-x4-upscaler exported/x4        # once (needs torch)
  cpuflow upscale --model exported/x4 small.png "a white cat" --out big.png   # 4x: 128x128 -> 512x512
  cpuflow upscale --model exported/x4 photo.jpg --noise-level 40 --steps 30 --seed 1 --tile 96
  cpuflow generate --model exported/sd15 "a lighthouse at dusk" -W 256 -H 256 --upscale exported/x4
"""


@click.command("upscale", epilog=EXAMPLES_UPSCALE)
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt", required=False, default="")
@click.option("--model", "-m", type=click.Path(path_type=Path), required=True,
              help="Exported x4 upscaler folder (cpuflow export stabilityai/stable-diffusion-x4-upscaler).")
@click.option("--noise-level", type=int, default=None,
              help="Noise added to the low-res image before upscaling: 0..350 (the model's max_noise_level); "
                   "more lets the model invent more detail (default 20).")
@click.option("--tile", type=int, default=None, metavar="N",
              help="Work on overlapping N x N tiles of the input (a multiple of 8, >= 32) to bound memory "
                   "(default: automatic, tiles of 128 above 128 px a side).")
@sampling_options
@load_options
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="A .png or .jpg file, or a folder (default: ./outputs/).")
@click.option("--no-watermark", is_flag=True, help="Do not put the invisible watermark on the image.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def upscale_command(image, prompt, model, noise_level, tile, negative_prompt, steps, sampler, schedule, guidance,
                    eta, seed, rng, backend, device, precision, variant, threads, no_cache, out, no_watermark, quiet):
    """Upscale IMAGE 4x with the x4 upscaler, guided by PROMPT (optional: what the image shows)."""
    from .cli import _output_paths
    from .config import LoadConfig, UpscaleRequest
    from .image import save_image_atomic
    from .pipelines.model import LoadedModel
    from .pipelines.upscale import require_upscaler, upscale

    # Validate everything the user typed before loading anything.
    req = UpscaleRequest(image=image, prompt=prompt, negative_prompt=negative_prompt, noise_level=noise_level,
                         steps=steps, sampler=sampler, schedule=schedule, guidance=guidance, seed=seed, eta=eta,
                         rng=rng, tile=tile, watermark=not no_watermark)
    cfg = LoadConfig(model=model, backend=backend, device=device, precision=precision, threads=threads,
                     variant=variant, use_cache=not no_cache)
    if out is not None and out.suffix:
        _output_paths(out, 1, False)   # a bad --out fails now; a folder is made only when the image is ready
    loaded = LoadedModel(cfg)
    try:
        require_upscaler(loaded)
        if loaded.manifest.random_weights and not quiet:
            click.echo("note: this model has random weights (made for latency work): its images are noise",
                       err=True)
        result = upscale(loaded, req, _progress_bar(quiet))
    finally:
        loaded.close()
    report(result)
    path = _output_paths(out, 1, False)["images"][0]
    click.echo(str(save_image_atomic(result.images[0], path, result.records[0])))


def _progress_bar(quiet: bool):
    if quiet:
        return None
    bars: list = []

    def progress(ev):
        if not bars:  # created at the first step, so nothing is drawn if the request fails first
            from tqdm import tqdm
            bars.append(tqdm(total=ev["n_steps"], unit="step", dynamic_ncols=True, file=sys.stderr, leave=False,
                             disable=None, desc="upscale"))
        bars[0].update(1)
        if ev["step"] >= ev["n_steps"]:
            bars[0].close()
    return progress


def report(result) -> None:
    """The tile choice, warnings and a one-line summary, on stderr."""
    rec, t = result.records[0], result.timings
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"tiles: {rec['tile_choice']}", err=True)
    click.echo(f"upscaled {rec['input_width']}x{rec['input_height']} -> {rec['width']}x{rec['height']}, "
               f"noise level {rec['noise_level']}, {rec['sampler']} {rec['steps']} steps, guidance "
               f"{rec['guidance']:g}, seed {rec['seed']} | {rec['backend']} {rec['device']} {rec['precision']} | "
               f"load {t.get('load_compile', 0):.1f}s, unet {t.get('unet', 0):.1f}s, "
               f"vae {t.get('vae_decoder', 0):.2f}s, total {t.get('total', 0):.1f}s", err=True)


def open_upscaler(folder: Path, cfg):
    """The x4 upscaler for `generate --upscale`: loaded like the generating model (backend,
    precision, threads, cache), its own variant; refused at once if it is no upscaler."""
    from dataclasses import replace

    from .pipelines.model import LoadedModel
    from .pipelines.upscale import require_upscaler

    model = LoadedModel(replace(cfg, model=folder, variant=None, low_memory=False))
    try:
        require_upscaler(model)
    except BaseException:
        model.close()
        raise
    return model


def upscale_generated(model, image, rec: dict):
    """(the image upscaled 4x, its record): the generated image's prompt, negative prompt,
    seed and noise generator, the upscaler's own defaults otherwise; what made the image
    before the upscale is kept in the record as ``base``."""
    from .config import UpscaleRequest
    from .pipelines.upscale import upscale

    req = UpscaleRequest(image=image, prompt=rec["prompt"], negative_prompt=rec["negative_prompt"],
                         seed=rec["seed"], rng=rec["rng"], watermark=rec.get("watermark") != "off")
    result = upscale(model, req)
    return result.images[0], dict(result.records[0], base=rec)
