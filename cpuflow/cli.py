"""The `cpuflow` command line.

Every CpuflowError becomes one line on stderr and the error's exit code; no
traceback reaches a user unless CPUFLOW_DEBUG=1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .config import RESIZE_MODES, SCHEDULES
from .errors import InvalidArgument, MissingDependency

EXAMPLES_GENERATE = """
\b
Examples:
  cpuflow generate "a red circle on a blue background"
  cpuflow generate --model exported/sd15 "a lighthouse at dusk, oil painting" \\
      --steps 25 --sampler dpmpp_2m --schedule karras --seed 42 --out lighthouse.png
  # img2img: the photo at the model's area with its own shape (a line says the size used)
  cpuflow generate --model exported/sd15 "a watercolor of a fox" \\
      --init-image photo.jpg --strength 0.6 --out fox.png
  # a 512x512 square from a landscape photo, keeping all of it (the bands repeat its edges)
  cpuflow generate --model exported/sd15 "a watercolor of a fox" --init-image photo.jpg -W 512 -H 512 --resize fit
  cpuflow generate "a green square on a white background" --n-samples 4 --grid --out grid.png
  # inpainting: repaint the white part of the mask; --inpaint-area masked works on the region only
  cpuflow generate --model exported/sd15-inpainting "a vase of tulips" --init-image room.png \
      --mask mask.png --mask-blur 4 --inpaint-area masked --padding 32 --out tulips.png
  # depth-to-image (stable-diffusion-2-depth): keep the shape of the room, estimate its depth, save it
  cpuflow generate --model exported/sd2-depth "a cosy wooden cabin interior" --init-image room.jpg \
      --strength 0.8 --save-depth --out cabin.png
  # the tiny autoencoder (a folder exported with --taesd): fast decode, and a preview every 5 steps
  # written beside the image: lighthouse.preview-0005.png, lighthouse.preview-0010.png, ...
  cpuflow generate --model exported/sd15 "a lighthouse" --decoder taesd --preview-every 5 --out lighthouse.png
"""


class CpuflowGroup(click.Group):
    """Maps CpuflowError to a one-line message and its exit code."""

    def invoke(self, ctx):
        from .cli_errors import exit_on_error
        with exit_on_error():
            return super().invoke(ctx)


@click.group(cls=CpuflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cpuflow")
def main():
    """cpuflow: Stable Diffusion on a CPU.

    Export a model once (`cpuflow export`), then generate images from the
    exported folder with no torch installed (`cpuflow generate`). With no
    --model, the small model shipped with cpuflow is used: it knows coloured
    shapes ("a red circle on a blue background"), and makes a picture in
    seconds, offline.
    """


def _samplers_help() -> str:
    from .samplers import SAMPLERS
    return ", ".join(SAMPLERS)


@main.command(epilog=EXAMPLES_GENERATE)
@click.argument("prompt", required=False)
@click.option("--model", "-m", type=click.Path(path_type=Path), default=None,
              help="Exported model folder (default: the model shipped with cpuflow).")
@click.option("--negative-prompt", "-n", default="", help="What the image should not show.")
@click.option("--steps", type=int, default=None,
              help="Denoising steps (default: the model's, from its export: 1 for SD-Turbo, 4 for an LCM, else 20).")
@click.option("--sampler", default=None, help="Sampler (default: the model's own scheduler). "
              "One of: ddim, plms, euler, euler_a, heun, dpmpp_2m, lcm.")
@click.option("--schedule", type=click.Choice(list(SCHEDULES)), default="default",
              help="Noise schedule: default = what the model's scheduler config says (Karras sigmas "
                   "when it sets use_karras_sigmas); karras / uniform force Karras sigmas on / off.")
@click.option("--guidance", "-g", type=float, default=None,
              help="Classifier-free guidance scale (default: the model's, usually 7.5; 0 for SD-Turbo; "
                   "1 or less skips the negative branch: 2x faster).")
@click.option("--guidance-rescale", type=float, default=0.0, show_default=True,
              help="Rescale the guided output towards the conditional one's spread (0..1; diffusers' "
                   "guidance_rescale, Lin et al. 2023): 0.7 for zero-terminal-SNR models at high guidance.")
@click.option("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic).")
@click.option("--seed", type=int, default=None, help="Seed 0..4294967295 (default: random, printed and saved).")
@click.option("--width", "-W", type=int, default=None,
              help="Width in pixels (default: the model's; with --init-image see --resize).")
@click.option("--height", "-H", type=int, default=None,
              help="Height in pixels (default: the model's; with --init-image see --resize).")
@click.option("--n-samples", type=int, default=1, help="Images to make (seeds seed, seed+1, ...).")
@click.option("--init-image", type=click.Path(path_type=Path), default=None, help="img2img: start from this image.")
@click.option("--resize", type=click.Choice(list(RESIZE_MODES)), default="crop", show_default=True,
              help="How --init-image (and --mask) is brought to the working size. Without -W/-H that size keeps "
                   "the photo's aspect ratio at the model's native area (512x512 for SD 1.5, 1024x1024 for SDXL: "
                   "a 1600x1200 photo on SD 1.5 becomes 592x440), with one of them the other follows the photo; "
                   "a line says the size used. When the aspect ratios differ (both -W and -H given): crop = "
                   "scale to cover and cut the overflowing edges (default: nothing is distorted or invented); "
                   "fit = scale to fit inside and fill the bands by repeating the photo's edge pixels (keeps "
                   "all of the photo); stretch = resize to the size, distorting it.")
@click.option("--strength", type=float, default=None,
              help="img2img / inpainting: how much to change the init image (0..1; default 0.8, "
                   "with --mask 1.0 as diffusers).")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Inpainting: repaint where this image is white, keep where black (any mode; resized to "
                   "the init image). Needs --init-image.")
@click.option("--mask-blur", type=int, default=0, help="Inpainting: blur the mask by PX pixels first (soft edges).")
@click.option("--inpaint-area", type=click.Choice(["whole", "masked"]), default="whole", show_default=True,
              help="Inpainting: the whole picture, or only the region around the mask at the model's size, "
                   "pasted back (fast on a large photo).")
@click.option("--padding", type=int, default=32, show_default=True,
              help="Inpainting with --inpaint-area masked: pixels of context around the mask.")
@click.option("--depth-map", type=click.Path(path_type=Path), default=None,
              help="Depth-to-image models: use this depth map (a grey image, bright = near) instead of "
                   "estimating one.")
@click.option("--save-depth", is_flag=True,
              help="Depth-to-image models: also write the depth map used, as OUT.depth.png (16-bit grey).")
@click.option("--backend", type=click.Choice(["openvino", "onnxruntime"]), default="openvino",
              help="Inference engine (default openvino: fastest on Intel/AMD CPUs).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="cuda needs --backend onnxruntime with onnxruntime-gpu.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "f32"]), default="auto",
              help="OpenVINO precision hint: auto picks bf16 on CPUs with AMX/AVX512-BF16, else f32.")
@click.option("--variant", default=None, help="Model variant (fp32, int8, ...; default: the fastest whose measured fidelity passes, see `cpuflow info`).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all physical cores).")
@click.option("--rng", type=click.Choice(["torch", "numpy"]), default="torch",
              help="Noise generator: torch (same images as diffusers for a seed) or numpy.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="A .png file for one image, or a folder for several (default: ./outputs/).")
@click.option("--grid", is_flag=True, help="Also save all images as one grid image.")
@click.option("--no-cache", is_flag=True, help="Do not use the compiled-model cache.")
@click.option("--low-memory", is_flag=True,
              help="One model component in memory at a time, the guidance pair as two batch-1 UNet calls "
                   "(half the UNet's activation memory), tiled VAE decoding, (OpenVINO) the mapped "
                   "weight file's pages dropped once the weights are packed, (ONNX Runtime) no CPU memory "
                   "arena: less RAM (SD 1.5 int8 at "
                   "512x512: 1.7 GB instead of 3.9), a little slower.")
@click.option("--decoder", type=click.Choice(["full", "taesd"]), default="full", show_default=True,
              help="Decode (and, for img2img, encode) with the full VAE or the tiny autoencoder (TAESD: much "
                   "faster, a little less detail; needs a folder exported with --taesd).")
@click.option("--deep-cache", "deep_cache", type=int, default=None, metavar="N",
              help="DeepCache: run the full UNet every N UNet calls and only its shallow branch in between, "
                   "reusing the deep features (about 1.5-2x faster UNet work for N=2-5, slightly different "
                   "images; needs a folder exported with --deep-cache). Counts UNet calls: heun makes 2 a step.")
@click.option("--preview-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Write a preview of the image every N steps beside the output, as OUT.preview-0005.png "
                   "(image-00000.preview-0005.png in a folder): through the tiny autoencoder when the folder "
                   "has one, else a rough 1/8-size colour approximation of the latents.")
@click.option("--clip-skip", type=int, default=None, metavar="N",
              help="Read the text encoder N-1 layers before its last one (A1111's Clip skip: 1 = the model's "
                   "own layer, 2 = diffusers' clip_skip=1; default: the model's).")
@click.option("--embedding", "embeddings", multiple=True, metavar="FILE[:TOKEN]",
              help="A textual-inversion embedding (.safetensors, A1111 .pt, diffusers learned_embeds), used "
                   "in the prompt by its file name or TOKEN. Repeatable.")
@click.option("--from-image", type=click.Path(path_type=Path), default=None, metavar="PNG",
              help="Take prompt, negative prompt, seed, sampler, schedule, steps, guidance, size and clip skip "
                   "from a PNG's parameters (cpuflow's or AUTOMATIC1111's); options given as well win.")
@click.option("--upscale", "upscaler", type=click.Path(path_type=Path), default=None, metavar="X4_DIR",
              help="Upscale each image 4x with this exported x4 upscaler before writing it (its own defaults: "
                   "noise level 20, 20 steps, guidance 9; the same prompt and seed; see `cpuflow upscale`).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="Quality of .jpg outputs (-o name.jpg); their parameters go to the EXIF UserComment.")
@click.option("--no-watermark", is_flag=True,
              help="Do not add the invisible watermark (images of 256x256 pixels or more carry one by "
                   "default; read it with `cpuflow watermark IMAGE`).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def generate(ctx, prompt, model, negative_prompt, steps, sampler, schedule, guidance, guidance_rescale, eta, seed,
             width, height, n_samples, init_image, resize, strength, mask, mask_blur, inpaint_area, padding, depth_map,
             save_depth, backend, device, precision, variant, threads, rng, out, grid, no_cache, low_memory, decoder,
             preview_every, clip_skip, embeddings, from_image, upscaler, deep_cache, jpeg_quality,
             no_watermark, quiet):
    """Generate images from PROMPT (txt2img, img2img with --init-image, inpainting with --mask,
    depth-to-image with a depth model).

    PROMPT takes AUTOMATIC1111's syntax: (word) and (word:1.3) weights, [word],
    BREAK, any length (75-token chunks); see the README's "Prompts" section.
    Each image is written as soon as it is made, so stopping a long run (Ctrl-C)
    loses only the image in progress."""
    from .config import GenerationRequest, LoadConfig
    from .image import make_grid, save_image_atomic, save_png_atomic
    from .pipelines.generate import generate as run
    from .pipelines.model import LoadedModel
    from .previews import with_previews

    given = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, schedule=schedule,
                 guidance=guidance, seed=seed, width=width, height=height, clip_skip=clip_skip)
    if from_image is not None:
        from .from_image import apply_from_image
        given = apply_from_image(ctx, from_image, given, quiet=quiet)
    if given["prompt"] is None:
        raise InvalidArgument("give a PROMPT (or --from-image PNG)")
    # Validate everything the user typed before loading anything.
    if init_image is None and ctx.get_parameter_source("strength") == click.core.ParameterSource.COMMANDLINE:
        raise InvalidArgument("--strength applies to img2img: give --init-image too, or leave --strength out")
    if init_image is None and ctx.get_parameter_source("resize") == click.core.ParameterSource.COMMANDLINE:
        raise InvalidArgument("--resize applies to an init image: give --init-image too, or leave --resize out")
    req = GenerationRequest(**given, guidance_rescale=guidance_rescale, eta=eta, n_samples=n_samples,
                            init_image=init_image, resize=resize,
                            strength=strength if strength is not None else 1.0 if mask is not None else 0.8,
                            rng=rng, decoder=decoder, mask=mask, mask_blur=mask_blur, inpaint_area=inpaint_area,
                            padding=padding, depth_map=depth_map, embeddings=embeddings,
                            watermark=not no_watermark, deep_cache=deep_cache).with_seed()
    cfg = LoadConfig(model=model, backend=backend, device=device, precision=precision, threads=threads,
                     variant=variant, use_cache=not no_cache, low_memory=low_memory)
    paths = _output_paths(out, n_samples, grid)
    x4 = None
    if upscaler is not None:  # a folder that is not an upscaler fails before anything is generated
        from .upscale_cli import open_upscaler, upscale_generated
        x4 = open_upscaler(upscaler, cfg)
    loaded = LoadedModel(cfg)
    if loaded.manifest.random_weights and not quiet:
        click.echo("note: this model has random weights (made for latency work): its images are noise", err=True)
    bars: list = []
    written: list[Path] = []
    previews: list[Path] = []      # of the image in progress: removed if it is never finished

    def progress(ev):
        # Created at the first step, so nothing is drawn if the request fails first.
        if not bars:
            from tqdm import tqdm
            bars.append(tqdm(total=ev["n_steps"] * ev["n_images"], unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=False, disable=None))
        bars[0].set_description(f"image {ev['image'] + 1}/{ev['n_images']}")
        bars[0].update(1)

    def save_preview(img, info):
        path = paths["images"][info["image"]]
        previews.append(save_png_atomic(img, path.with_name(f"{path.stem}.preview-{info['step']:04d}.png")))

    def save(img, rec):
        if x4 is not None:
            img, rec = upscale_generated(x4, img, rec)
        written.append(save_image_atomic(img, paths["images"][len(written)], rec, jpeg_quality=jpeg_quality))
        previews.clear()   # they belong to a finished image now

    try:
        from .pipelines.init_image import announce
        size_line = announce(loaded, req)   # e.g. "img2img: 1600x1200 photo -> 592x440 (crop)"
        if size_line is not None:
            click.echo(size_line, err=True)
        result = run(loaded, req, with_previews(loaded, None if quiet else progress,
                                                save_preview if preview_every else None, preview_every or 1),
                     on_image=save, keep_images=grid)
    except (Exception, KeyboardInterrupt) as e:
        for p in previews:
            p.unlink(missing_ok=True)
        if isinstance(e, KeyboardInterrupt) and written:
            click.echo(f"interrupted: {len(written)} of {len(paths['images'])} image(s) were written "
                       f"(the last: {written[-1]}); the image in progress was not", err=True)
            sys.exit(130)
        if written:
            click.echo(f"note: {len(written)} image(s) were written before the error (the last: {written[-1]})",
                       err=True)
        raise
    finally:
        for b in bars:
            b.close()
        loaded.close()
        if x4 is not None:
            x4.close()
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if grid:
        from .watermark import apply as apply_watermark
        sheet, mark = apply_watermark(make_grid(result.images), not no_watermark)   # a written image too
        written.append(save_image_atomic(sheet, paths["grid"], dict(result.records[0], watermark=mark),
                                         jpeg_quality=jpeg_quality))
    if save_depth:
        if "depth_map" not in result.extras:
            click.echo("warning: --save-depth: this is not a depth-to-image model; no depth map written", err=True)
        else:
            first = paths["images"][0]
            written.append(save_png_atomic(result.extras["depth_map"], first.with_name(f"{first.stem}.depth.png")))
    t = result.timings
    rec0 = result.records[0]
    summary = (f"{len(result.records)} image(s) {rec0['width']}x{rec0['height']}"
               + (f" (upscaled x4 to {rec0['width'] * 4}x{rec0['height'] * 4})" if x4 is not None else "")
               + f", {rec0['sampler']} "
               f"{rec0['steps']} steps, seed {rec0['seed']}"
               + (f"..{result.records[-1]['seed']}" if len(result.records) > 1 else "")
               + (f", deep cache every {rec0['deep_cache']}" if rec0.get("deep_cache") else "")
               + f" | {rec0['backend']} {rec0['device']} {rec0['precision']}"
               + f" | load {t.get('load_compile', 0):.1f}s, text {t.get('text_encoder', 0):.2f}s, "
               f"unet {t.get('unet', 0):.1f}s ({t.get('unet_per_call', 0):.3f}s/call), "
               + (f"taesd {t.get('taesd_decoder', 0):.2f}s" if decoder == "taesd"
                  else f"vae {t.get('vae_decoder', 0):.2f}s") + f", total {t.get('total', 0):.1f}s")
    click.echo(summary, err=True)
    for p in written:
        click.echo(str(p))


# Suffixes of image formats cpuflow does not write: refused instead of becoming folder names.
OTHER_IMAGE_SUFFIXES = {".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".jxl"}


def _output_paths(out: Path | None, n: int, grid: bool) -> dict:
    """One image and a .png / .jpg path: that file. Several images and such a
    path: numbered files beside it. Otherwise a folder with numbered files that
    never overwrite earlier ones."""
    from .image import IMAGE_SUFFIXES
    suffix = out.suffix.lower() if out is not None else ""
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise InvalidArgument(f"--out {out}: cpuflow writes .png or .jpg images, not {suffix}",
                              hint="use a .png or .jpg file name, or a folder")
    if out is not None and suffix in IMAGE_SUFFIXES and n == 1:
        if not out.parent.exists():
            raise InvalidArgument(f"output folder {out.parent} does not exist")
        return {"images": [out], "grid": out.with_name(out.stem + "-grid" + out.suffix)}
    if out is not None and suffix in IMAGE_SUFFIXES:
        folder, stem, ext = out.parent, out.stem, out.suffix
        if not folder.exists():
            raise InvalidArgument(f"output folder {folder} does not exist")
    else:
        folder, stem, ext = (out or Path("outputs")), "image", ".png"
        if folder.exists() and not folder.is_dir():
            raise InvalidArgument(f"--out {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
    start = 0
    while any((folder / f"{stem}-{start + i:05d}{ext}").exists() for i in range(n)):
        start += n
    images = [folder / f"{stem}-{start + i:05d}{ext}" for i in range(n)]
    return {"images": images, "grid": folder / f"{stem}-{start:05d}-grid{ext}"}


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
def info(model_dir, as_json, verify):
    """Show what an exported model folder holds (default: the shipped model)."""
    from .manifest import load_manifest
    from .pipelines.model import shipped_model_dir
    root = model_dir or shipped_model_dir()
    m = load_manifest(root, verify="sha256" if verify else "size")
    if as_json:
        click.echo(json.dumps(m.raw, indent=2))
        return
    tools = m.raw.get("export", {}).get("tools", {})
    lines = [
        f"model        {m.name}  ({root})",
        f"family       {m.family}, {m.prediction_type} prediction"
        + ("  [RANDOM WEIGHTS: latency work only]" if m.random_weights else ""),
        f"validated    {'yes' if m.validated else 'NO (exported with --force)'}",
        f"size         default {m.default_width}x{m.default_height}, latents {m.latent_channels}ch /{m.downscale},"
        f" scaling {m.scaling_factor:g}",
        f"scheduler    {m.scheduler.get('_class_name', '?')} ({m.scheduler.get('beta_schedule', '?')}, "
        f"{m.scheduler.get('num_train_timesteps', '?')} steps)",
        f"tokenizer    max {m.tokenizer.get('max_length')} tokens",
        f"formats      {', '.join(sorted(m.formats()))}",
        f"hash         {m.model_hash}",
        f"source       {m.raw.get('source', {}).get('kind', '?')}: {m.raw.get('source', {}).get('name', '?')}",
        f"exported     {m.raw.get('export', {}).get('created', '?')} by cpuflow {tools.get('cpuflow', '?')}",
        "components:",
    ]
    from .cpu import int8_dot_products_exact
    from .pipelines.model import FORMAT_OF_BACKEND
    from .variants import choose_variant
    for backend, fmt in FORMAT_OF_BACKEND.items():
        if fmt in m.formats():
            choice = choose_variant(m, fmt, int8_exact=int8_dot_products_exact())
            lines.insert(-1, f"variant      {backend}: {choice.name} ({choice.reason})")
    for name, comp in m.components.items():
        ins = ", ".join(f"{s.name}{list(s.shape)}" for s in comp.inputs)
        lines.append(f"  {name:<13} {ins}")
        for vname, var in comp.variants.items():
            size = sum(int(m.files[p]["size"]) for paths in var.files.values() for p in paths if p in m.files)
            par = "; ".join(
                f"{fmt} psnr {p.get('psnr_db', float('nan')):.1f} dB" for fmt, p in var.parity.items()
                if isinstance(p, dict) and "psnr_db" in p)
            lines.append(f"    {vname:<11} {var.precision:<12} {size / 1e6:8.1f} MB  {par}")
    click.echo("\n".join(lines))


@main.command("samplers")
def list_samplers():
    """List the samplers (names for --sampler)."""
    from .samplers import SAMPLERS
    for name, spec in SAMPLERS.items():
        click.echo(f"{name:<10} {getattr(spec, 'description', '')}")


def _mount_export():
    """`cpuflow export` lives in the export stage (needs torch); mount it lazily
    so the runtime CLI starts fast and works without torch."""

    @main.command("export", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                              "help_option_names": []})
    @click.pass_context
    def export(ctx):
        """Convert a model to ONNX / OpenVINO (needs the `export` extra: torch)."""
        cmd = _load_export_command()
        return cmd.main(args=ctx.args, prog_name="cpuflow export", standalone_mode=False)


def _load_export_command():
    # Look the export extra up without importing it: the runtime never imports torch itself.
    import importlib.util
    for name in ("torch", "diffusers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingDependency(f"`cpuflow export` needs the export extra ({name} is missing)",
                                    hint="pip install 'cpuflow[export]' torch==2.13.0 "
                                         "(a CPU build of torch is enough)")
    try:
        from cpuflow_export.cli import export_command
    except ImportError:
        from export.cli import export_command  # running from a source checkout
    return export_command


_mount_export()

from .serve_cli import serve_command  # noqa: E402  (imports fastapi lazily)

main.add_command(serve_command)

from .bench.cli import bench_command  # noqa: E402  (torch only with --reference torch)

main.add_command(bench_command)

from .batch.cli import batch_command  # noqa: E402  (ray only with --ray)

main.add_command(batch_command)

from .upscale_cli import upscale_command  # noqa: E402

main.add_command(upscale_command)

from .watermark_cli import watermark_command  # noqa: E402

main.add_command(watermark_command)

if __name__ == "__main__":
    main()
