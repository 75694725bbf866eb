"""`cpuflow export`: the click command the top-level CLI mounts.

Nothing heavy is imported at module import time (torch, diffusers, onnx and
openvino are imported inside the command), so `cpuflow --help` stays fast.
"""
from __future__ import annotations

from pathlib import Path

import click

from cpuflow.errors import InvalidArgument

from .calibrate import DEFAULT_SAMPLES as CALIBRATION_SAMPLES
from .calibrate import DEFAULT_SIZE as CALIBRATION_SIZE
from .calibrate import DEFAULT_STEPS as CALIBRATION_STEPS
from .quantize import MODES as QUANTIZE_MODES
from .quantize import NEEDS_CALIBRATION, check_mode_formats

EXAMPLES = """
\b
Examples:
  # a diffusers folder (or hub id) -> ONNX + OpenVINO, float32 weights
  cpuflow export runwayml/stable-diffusion-v1-5 exported/sd15
  # a single-file checkpoint, OpenVINO only, weights stored as fp16
  cpuflow export v1-5-pruned-emaonly.safetensors exported/sd15 --format openvino --weights fp16
  # SD 2.1 768 (v-prediction) from a single file, tokenizer from a folder
  cpuflow export v2-1_768-ema-pruned.safetensors exported/sd21 --prediction-type v_prediction \\
      --tokenizer clip-tokenizer/
  # random weights of the SD 1.5 architecture, for latency work (no download)
  cpuflow export --random-weights --arch sd15 exported/sd15-random
  # SDXL base: a diffusers folder (or hub id); generates at 1024x1024 by default
  cpuflow export stabilityai/stable-diffusion-xl-base-1.0 exported/sdxl
  # full SDXL base architecture with random weights (the CLIP tokenizer serves both)
  cpuflow export --random-weights --arch sdxl exported/sdxl-random --tokenizer clip-tokenizer/
  # the x4 upscaler (for `cpuflow upscale`), or its architecture with random weights
  cpuflow export stabilityai/stable-diffusion-x4-upscaler exported/x4
  cpuflow export --random-weights --arch x4-upscaler exported/x4-random --tokenizer clip-tokenizer/
  # add int8 variants beside fp32 (the runtime then prefers int8; --variant fp32 still works)
  cpuflow export runwayml/stable-diffusion-v1-5 exported/sd15 --quantize int8 --quantize int8-weights
  # merge LoRAs into the UNet and text encoder first (FILE[:SCALE], repeatable; diffusers or kohya format)
  cpuflow export runwayml/stable-diffusion-v1-5 exported/sd15-lcm --lora lcm-lora-sdv1-5.safetensors
  cpuflow export sd15.safetensors exported/sd15-style --lora style.safetensors:0.8 --lora detail.safetensors:0.5
  # add the tiny autoencoder (TAESD) for fast previews and --decoder taesd
  cpuflow export runwayml/stable-diffusion-v1-5 exported/sd15 --taesd madebyollin/taesd
  cpuflow export --random-weights --arch sd15 exported/sd15-random --taesd random
  cpuflow export stabilityai/stable-diffusion-xl-base-1.0 exported/sdxl --taesd madebyollin/taesdxl
  # OpenVINO only: each component goes straight from torch to OpenVINO IR (no ONNX
  # intermediate, about half the peak memory: what lets full-size SDXL export in 24 GB)
  cpuflow export --random-weights --arch sdxl exported/sdxl-random --format openvino \\
      --tokenizer clip-tokenizer/ --taesd random
  # few-step models: the steps / guidance `cpuflow generate` uses when the user gives none
  # (stabilityai/sd-turbo and sdxl-turbo get 1 step, guidance 0 by themselves; LCMs 4 steps)
  cpuflow export ./my-sd-turbo-copy exported/sd-turbo --default-steps 1 --default-guidance 0
  # DeepCache: two more UNet graphs, for `cpuflow generate --deep-cache N` (reuses the deep
  # features for N-1 of every N UNet calls: faster, a little different; see README)
  cpuflow export runwayml/stable-diffusion-v1-5 exported/sd15 --deep-cache
  # calibrate on your own prompts (one a line), 32 of them, 12 steps each
  cpuflow export sd15.safetensors exported/sd15 --quantize hybrid --calibration-prompts my.txt \\
      --calibration-size 32 --calibration-steps 12
  # slower, more thorough int8 calibration: at the model's own size, every captured UNet input
  cpuflow export sd15.safetensors exported/sd15 --quantize int8 --calibration-resolution model \\
      --calibration-samples all

\b
The export is checked against torch before anything is kept: every component
must reproduce the float32 torch output within its tolerance (figures are
printed and stored in cpuflow.json), else nothing is written and the exit code
is non-zero. OUT_DIR appears only complete; a previous export there is replaced
atomically; a folder that is not a cpuflow export is never replaced.

\b
--quantize MODE (repeatable) adds a variant beside the fp32 files, never instead:
  int8-weights  weights stored as int8, compute in float (smaller files, speed near fp32)
  int8          UNet weights and activations int8 (calibrated; its most sensitive layers
                stay float, see export/quantize.py); text encoder int8
  int8-7bit     int8 with the UNet's weights in a 7-bit range, OpenVINO files only: for
                CPUs without VNNI (most laptops before 2021), whose int8 kernels
                saturate on full-range weights; less loss than int8 there, but not
                within 2 points, so it runs only with --variant int8-7bit
  hybrid        optimum-intel's recipe: UNet convolutions (and, in OpenVINO, attention)
                int8 with activations, linear layers int8 weights only
int8, int8-7bit and hybrid calibrate on the UNet inputs of real runs: the model's own sampler
on --calibration-size prompts for --calibration-steps steps, at
--calibration-resolution; --calibration-samples of those inputs, spread over the
noise levels and prompts, feed the quantizers' statistics passes. Each kept input
costs a float32 UNet call in every pass, so these options set the export's time.
The PSNR of every variant against torch fp32 (and, for the UNet, against the fp32
export on a held-out prompt at the model's own size) is printed and stored in
cpuflow.json, with the calibration used.
"""

FORMAT_CHOICES = {"onnx": ("onnx",), "openvino": ("openvino",), "both": ("onnx", "openvino")}


@click.command("export", epilog=EXAMPLES,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("paths", nargs=-1, metavar="[SOURCE] OUT_DIR")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMAT_CHOICES)), default="both", show_default=True,
              help="Which files to write: ONNX (onnxruntime), OpenVINO IR, or both. openvino alone converts "
                   "torch -> IR directly (no ONNX intermediate: less memory and disk).")
@click.option("--weights", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="How weights are stored. fp16 halves the files; computation stays float32 on CPU.")
@click.option("--force", is_flag=True,
              help="Keep an export that fails the parity check against torch (marked validated: false).")
@click.option("--allow-pickle", is_flag=True,
              help="Allow loading a pickle .ckpt (restricted loader, weights only). Off by default: "
                   "pickles can run code.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Override what the UNet predicts (default: from the source; SD 2.x 768 models use v).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder with the CLIP tokenizer files (vocab.json, merges.txt), when SOURCE has none.")
@click.option("--random-weights", is_flag=True,
              help="Build the --arch architecture with random weights (no SOURCE): for latency work, "
                   "images are noise.")
@click.option("--arch", type=click.Choice(["sd15", "sd21", "sd21-v", "sdxl", "sd15-lcm", "sd21-turbo", "sd15-inpaint",
                                           "x4-upscaler"]),
              default=None,
              help="Architecture for --random-weights (or to force one for a single-file SOURCE). x4-upscaler: "
                   "stabilityai/stable-diffusion-x4-upscaler (for `cpuflow upscale`). sd15-lcm "
                   "(LCM-Dreamshaper-v7: guidance-embedding UNet, LCMScheduler) and sd21-turbo (SD-Turbo: Euler, "
                   "trailing timesteps) are latency variants for --random-weights only, as is sd15-inpaint "
                   "(stable-diffusion-inpainting: a 9-channel UNet).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for --random-weights, the parity-check inputs and the calibration runs.")
@click.option("--quantize", "quantize", multiple=True, type=click.Choice(QUANTIZE_MODES),
              help="Add a quantized variant beside fp32 (repeatable): int8-weights, int8, int8-7bit or hybrid.")
@click.option("--calibration-prompts", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Text file of calibration prompts, one a line (default: the shipped list of 64).")
@click.option("--calibration-size", type=click.IntRange(min=1), default=CALIBRATION_SIZE, show_default=True,
              help="How many prompts (the first ones of the list) calibrate int8 / hybrid.")
@click.option("--calibration-steps", type=click.IntRange(1, 1000), default=None,
              help="Sampler steps per calibration prompt (one UNet input captured per call). Default: "
                   f"{CALIBRATION_STEPS}, or a few-step model's own default steps (SD-Turbo 1, LCM 4: the "
                   "trajectory it runs), with more prompts of the list when the samples need them.")
@click.option("--calibration-samples", "calibration_samples", default=str(CALIBRATION_SAMPLES), show_default=True,
              metavar="N|all",
              help="How many of the captured UNet inputs the quantizers measure (each is a float32 UNet call "
                   "per statistics pass: the main cost of int8 / hybrid). Chosen spread over the noise levels, "
                   "cycling the prompts; prompts stop sampling after their last chosen call. all: every call.")
@click.option("--calibration-resolution", "calibration_resolution", default="auto", show_default=True,
              metavar="auto|model|PX",
              help="Image side the calibration runs sample at. auto: half the model's default size, at least "
                   "256 (256 for SD 1.5: ~4x cheaper UNet calls, ranges measured within the gate; the held-out "
                   "check still runs at the model's size); model: the model's size; or pixels, e.g. 384.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Merge a LoRA .safetensors file (diffusers/peft or kohya format) into the UNet and text "
                   "encoder before export, at SCALE (default 1.0). Repeatable; recorded in cpuflow.json.")
@click.option("--taesd", "taesd", default=None, metavar="TAESD_SOURCE",
              help="Also export the tiny autoencoder (AutoencoderTiny) as taesd_decoder / taesd_encoder, for "
                   "`generate --decoder taesd` and per-step previews: a diffusers AutoencoderTiny folder, a hub "
                   "id (madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL), or random (with "
                   "--random-weights; the TAESD/TAESDXL architecture, fits both). Never quantized.")
@click.option("--default-steps", "default_steps", type=int, default=None, metavar="N",
              help="Steps `cpuflow generate` (and the web page) use for this model when no --steps is given, "
                   "recorded in cpuflow.json. Default: 1 for stabilityai/sd-turbo and sdxl-turbo, 4 for an LCM "
                   "(LCMScheduler), else the runtime's 20. E.g. --default-steps 1 for a local SD-Turbo copy.")
@click.option("--default-guidance", "default_guidance", type=float, default=None, metavar="G",
              help="Guidance scale used when no --guidance is given, recorded in cpuflow.json. Default: 0 for "
                   "the Turbo hub ids, 8.5 for an LCM with a guidance embedding (1 without), else 7.5 (SDXL: 5). "
                   "E.g. --default-guidance 0 for SD-Turbo (no negative branch).")
@click.option("--default-clip-skip", "default_clip_skip", type=int, default=None, metavar="N",
              help="Clip skip used when no --clip-skip is given (A1111's meaning: 1 = the text encoder's own "
                   "layer, 2 = one earlier, as many anime models expect), recorded in cpuflow.json. Default: 1.")
@click.option("--deep-cache", "deep_cache", is_flag=True,
              help="Also export the DeepCache UNet graphs (a full UNet that also outputs its deep feature, and "
                   "the shallow branch that reuses it) for `cpuflow generate --deep-cache N`. They hold the UNet's "
                   "weights once more (about +1x the UNet on disk per format) and are never quantized.")
def export_command(paths, fmt, weights, force, allow_pickle, prediction_type, tokenizer_dir,
                   random_weights, arch, seed, quantize, calibration_prompts, calibration_size,
                   calibration_steps, calibration_samples, calibration_resolution, loras, taesd, default_steps,
                   default_guidance, default_clip_skip, deep_cache):
    """Convert a Stable Diffusion model (SOURCE: a diffusers folder, a single
    .safetensors file, or a Hugging Face hub id; SD 1.x, 2.x, or SDXL base as a
    diffusers folder / hub id) into an exported model folder OUT_DIR that
    `cpuflow generate` runs without torch."""
    from cpuflow.cli_errors import exit_on_error
    with exit_on_error("interrupted: nothing was written (a previous export, if any, is untouched)"):
        source, out_dir = _split_paths(paths, random_weights)
        _run(source, out_dir, formats=FORMAT_CHOICES[fmt], weights=weights, force=force,
             allow_pickle=allow_pickle, prediction_type=prediction_type, tokenizer_dir=tokenizer_dir,
             random_weights=random_weights, arch=arch, seed=seed, taesd=taesd,
             quantize=dict(quantize=quantize, calibration_prompts=calibration_prompts,
                           calibration_size=calibration_size, calibration_steps=calibration_steps,
                           calibration_samples=calibration_samples,
                           calibration_resolution=calibration_resolution),
             loras=loras, default_steps=default_steps, default_guidance=default_guidance,
             default_clip_skip=default_clip_skip, deep_cache=deep_cache)


def _split_paths(paths: tuple[str, ...], random_weights: bool) -> tuple[str | None, Path]:
    if len(paths) == 2:
        return paths[0], Path(paths[1])
    if len(paths) == 1:
        if not random_weights:
            raise InvalidArgument("missing SOURCE: pass SOURCE OUT_DIR, or --random-weights --arch ARCH OUT_DIR")
        return None, Path(paths[0])
    if not paths:
        raise InvalidArgument("missing OUT_DIR (usage: cpuflow export [SOURCE] OUT_DIR)")
    raise InvalidArgument(f"expected [SOURCE] OUT_DIR, got {len(paths)} paths: {' '.join(paths)}")


def _run(source, out_dir: Path, *, formats, weights, force, allow_pickle, prediction_type, tokenizer_dir,
         random_weights, arch, seed, quantize=None, loras=(), taesd=None, default_steps=None,
         default_guidance=None, default_clip_skip=None, deep_cache=False) -> None:
    if random_weights and source is not None:
        raise InvalidArgument("--random-weights takes no SOURCE (it builds --arch with random weights)")
    if random_weights and arch is None:
        raise InvalidArgument("--random-weights needs --arch (sd15, sd21, sd21-v, sdxl, sd15-lcm, sd21-turbo, "
                              "sd15-inpaint or x4-upscaler)")
    if arch == "x4-upscaler" and not random_weights:
        raise InvalidArgument("--arch x4-upscaler builds random weights: use it with --random-weights (the real "
                              "upscaler is exported from its diffusers folder or hub id, no --arch needed)")
    if arch in ("sd15-lcm", "sd21-turbo", "sd15-inpaint") and not random_weights:
        raise InvalidArgument(f"--arch {arch} is a random-weights latency variant: use it with --random-weights "
                              "(a real LCM / Turbo model is exported from its folder or hub id, no --arch needed)")

    from .build import ConsoleProgress, export_model, preflight
    from .fewstep_defaults import user_defaults
    user_defaults(default_steps, default_guidance)  # a bad value fails before the (slow) load
    from cpuflow.prompt_encoding import check_clip_skip
    check_clip_skip(default_clip_skip)
    from .sources import load_source

    quantize = dict(quantize or {})
    from .calibrate import parse_resolution, parse_samples
    if "calibration_samples" in quantize:  # "all" or N; a bad value fails before the (slow) load
        quantize["calibration_samples"] = parse_samples(quantize["calibration_samples"])
    if "calibration_resolution" in quantize:
        quantize["calibration_resolution"] = parse_resolution(quantize["calibration_resolution"] or "auto")
    if quantize.get("quantize"):  # a bad prompt file or size fails before the (slow) load
        if weights != "fp32":
            raise InvalidArgument("--quantize makes its variants from float32 weights; use --weights fp32 with it")
        check_mode_formats(quantize["quantize"], formats)    # e.g. int8-7bit: OpenVINO files only
        if any(m in NEEDS_CALIBRATION for m in quantize["quantize"]):
            from .calibrate import read_prompts, select_prompts
            select_prompts(read_prompts(quantize.get("calibration_prompts")), quantize["calibration_size"])

    elif quantize.get("calibration_prompts") is not None:
        raise InvalidArgument("--calibration-prompts needs --quantize int8, int8-7bit or hybrid")
    out_dir = preflight(out_dir)  # a bad OUT_DIR fails before the (slow) load
    if loras:  # so does a missing or non-LoRA file
        from .lora import merge_loras, preflight_loras
        loras = preflight_loras(loras)
    tiny = None
    if taesd is not None:  # small, and a bad TAESD_SOURCE fails before the (slow) load too
        from .taesd import load_taesd
        tiny = load_taesd(taesd, random_weights=random_weights, seed=seed,
                          progress=lambda msg: click.echo(f"[taesd] {msg}", err=True))

    progress = ConsoleProgress()
    loaded = load_source(source, arch=arch, random_weights=random_weights, allow_pickle=allow_pickle,
                         prediction_type=prediction_type, tokenizer=tokenizer_dir, seed=seed,
                         progress=lambda msg: click.echo(f"[source] {msg}", err=True))
    if loras:
        merge_loras(loaded, loras, progress=lambda msg: click.echo(f"[lora] {msg}", err=True))
    if tiny is not None:
        from .taesd import attach_taesd
        attach_taesd(loaded, *tiny)
    try:
        out = export_model(loaded, out_dir, formats=formats, weights=weights, force=force,
                           progress=progress, seed=seed, default_steps=default_steps,
                           default_guidance=default_guidance, default_clip_skip=default_clip_skip,
                           deep_cache=deep_cache, **quantize)
    finally:
        progress.close()
    del loaded
    click.echo(f"exported to {out}", err=True)
