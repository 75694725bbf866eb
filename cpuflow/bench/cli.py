"""`cpuflow bench`: the click command the top-level CLI mounts.

Only click is imported at module import time; the runner is imported when the
command runs, so `cpuflow --help` stays fast and torch-free.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import InvalidArgument

EXAMPLES = """
\b
Examples:
  # SD 1.5 architecture, random weights (exported once and cached), OpenVINO
  # default precision vs f32 hint, against diffusers fp32 on the same weights:
  cpuflow bench --arch sd15 --precision auto --precision f32 --reference torch \\
      --json sd15.json --chart sd15.png
  # an exported folder, both backends, only the UNet and the VAE, quick:
  cpuflow bench exported/sd15 --backend openvino --backend onnxruntime \\
      --stages unet,vae --repeat 2
  # against torch on the weights the folder was exported from:
  cpuflow bench exported/sd15 --reference torch --reference-source runwayml/stable-diffusion-v1-5
  # the peers, side by side in interleaved rounds (best image of each, peak RSS, cpuflow / fastest peer):
  # OpenVINO GenAI and diffusers on the same weights as an optimum-intel folder
  # (python -m cpuflow_export.optimum_layout OUT --random-weights --arch sd15 writes one)
  cpuflow bench exported/sd15-random --stages e2e --rounds 2 --repeat 1 --steps 10 \\
      --reference genai --reference torch --reference-source genai=sd15-optimum
  # optimum-intel too, from a virtual environment of its own (its pins conflict with this project's)
  cpuflow bench exported/sd15-random --stages e2e --rounds 2 --reference genai --reference optimum-intel \\
      --reference-source sd15-optimum --peer-python /opt/optimum-venv/bin/python
  # the tiny autoencoder (a folder exported with --taesd): its decode, and whole images decoded by it
  cpuflow bench exported/sd15 --stages vae,taesd,e2e --decoder taesd
  # SDXL at its default 1024x1024 with guidance (UNet at batch 2); e2e with 2 steps
  # (--no-compile-cache: its OpenVINO compiled cache would need another 10+ GB of disk)
  cpuflow bench exported/sdxl --stages text,unet,vae,taesd,e2e,load --steps 2 --repeat 1 \
      --no-compile-cache
  # images per minute of `cpuflow batch` with 1, 2, ... worker processes on the shipped model (or a
  # MODEL_DIR); the fastest is recorded for this CPU and model, and `cpuflow batch` then runs it
  cpuflow bench --throughput
  # SDXL-Turbo style: 512x512, one step, no guidance (UNet at batch 1), tiny decoder
  cpuflow bench exported/sdxl -W 512 -H 512 --steps 1 --guidance 0 --decoder taesd \
      --stages text,unet,taesd,e2e --no-compile-cache

\b
Stages: text (one text-encoder call; both encoders for SDXL), unet (one UNet call, batch 2 with
guidance), vae (one VAE decode), taesd (one decode by the tiny autoencoder, for
folders exported with --taesd; not in the default set), e2e (one whole image,
decoded with --decoder; for an x4 upscaler: upscale, one whole upscale to the
model's size from a quarter of it, 128 -> 512), load (load + compile:
first start with an empty compiled cache, then second start on that cache).
Every stage of every configuration runs in a process of its own: its peak RSS
is that process's high-water mark (VmHWM).
"""


@click.command("bench", epilog=EXAMPLES,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False), required=False)
@click.option("--arch", type=click.Choice(["sd15", "sd21", "sd21-v", "sd15-lcm", "sd21-turbo", "sdxl",
                                           "sd15-inpaint", "x4-upscaler"]),
              default=None,
              help="Benchmark this architecture with random weights instead of MODEL_DIR (exported once, "
                   "cached under the user cache dir in bench-models/; needs the export extra the first time). "
                   "sdxl is exported OpenVINO-only (about 17 GB peak RAM, 10 GB of disk, tens of minutes).")
@click.option("--rebuild", is_flag=True, help="With --arch: export the random-weights model again.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="With --arch, for the first build: a CLIP tokenizer folder (vocab.json, merges.txt) when the "
                   "Hugging Face cache has none, e.g. from scripts/fetch_clip_vocab.sh.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["openvino", "onnxruntime"]),
              help="Backend(s) to measure; repeat the option for several (default openvino).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["auto", "bf16", "f32"]),
              help="Precision hint(s); repeat for several (default auto).")
@click.option("--variant", "variants", multiple=True,
              help="Model variant(s): fp32, int8, ...; repeat for several (default: the model's preferred).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--reference", "references", multiple=True, type=click.Choice(["torch", "genai", "optimum-intel"]),
              help="Also run, on the same weights: torch = diffusers (PyTorch fp32), with speed-ups against it; "
                   "genai = OpenVINO GenAI Text2ImagePipeline, optimum-intel = OVStableDiffusionPipeline (both "
                   "on an optimum-intel folder, static shapes, e2e and load stages only; the report compares "
                   "cpuflow's best image with the fastest peer's). Repeatable.")
@click.option("--reference-source", "reference_sources", multiple=True, metavar="[NAME=]SOURCE",
              help="torch: the weights a MODEL_DIR was exported from (diffusers folder, checkpoint or hub id; not "
                   "needed with --arch or a --random-weights export). genai / optimum-intel: the optimum-intel "
                   "OpenVINO folder (python -m cpuflow_export.optimum_layout writes one). A bare SOURCE goes to "
                   "the peers asked for, else to torch; NAME=SOURCE to one reference; repeat a peer's for "
                   "several folders (fp32, int8 ...), one column each.")
@click.option("--peer-python", default=None, type=click.Path(dir_okay=False),
              help="The Python interpreter that runs the optimum-intel reference (a virtual environment where "
                   "optimum-intel imports; its pins conflict with this project's, see bench/README.md).")
@click.option("--rounds", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Run every stage but load this many times per column, the columns interleaved in each round "
                   "(cpuflow, peer, cpuflow, peer ...), so slow drift of the machine hits every engine alike.")
@click.option("--width", "-W", type=int, default=None, help="Image width (default: the model's).")
@click.option("--height", "-H", type=int, default=None, help="Image height (default: the model's).")
@click.option("--steps", type=int, default=None,
              help="Steps of the end-to-end image (default 20; --throughput: the model's default).")
@click.option("--guidance", "-g", type=float, default=7.5, show_default=True,
              help="Guidance scale (above 1: the UNet runs at batch 2).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all physical cores).")
@click.option("--repeat", type=int, default=3, show_default=True, help="Counted repetitions per stage.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Uncounted warm-up runs per stage.")
@click.option("--stages", default="text,unet,vae,e2e,load", show_default=True,
              help="Comma-separated stages to measure (also: taesd).")
@click.option("--decoder", type=click.Choice(["full", "taesd"]), default="full", show_default=True,
              help="Decoder of the e2e image: the full VAE or the tiny autoencoder (folders exported with "
                   "--taesd; no torch reference for it).")
@click.option("--no-compile-cache", "no_compile_cache", is_flag=True,
              help="Keep no compiled-model cache on disk: every stage's process compiles from the model files, "
                   "and the load stage measures first starts only. For models whose OpenVINO cache does not fit "
                   "the disk (full-size SDXL: about as big as its fp32 weights, 10+ GB); turned on by itself, "
                   "with a note, when the caches would not fit the free disk.")
@click.option("--prompt", default=None, help="Prompt for the text encoder and the image.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write every number (and the machine, settings, versions) to this JSON file.")
@click.option("--chart", "chart_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write a PNG bar chart of the medians to this file.")
@click.option("--timeout", "job_timeout", type=float, default=None,
              help="Kill a worker process after this many seconds (default: no limit).")
@click.option("--throughput", is_flag=True,
              help="Instead of stages: images per minute of `cpuflow batch` with 1, 2, 4, ... worker processes "
                   "(up to the physical cores) on MODEL_DIR (default: the shipped model) at its default size and "
                   "steps; records the fastest count for this CPU and model, which `cpuflow batch` then uses.")
@click.option("--throughput-images", type=click.IntRange(2, 10000), default=8, show_default=True,
              help="--throughput: counted images per worker count (after --warmup images per worker).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench_command(**opts):
    """Measure per-stage latency and peak memory of MODEL_DIR (or --arch), for
    every backend x variant x precision asked for, optionally against torch."""
    from ..cli_errors import exit_on_error
    with exit_on_error("interrupted: no result written"):
        _run(**opts)


def _run(*, model_dir, arch, rebuild, tokenizer_dir, backends, precisions, variants, device, references=(),
         reference_sources=(), width, height, steps, guidance, threads, repeat, warmup, stages, prompt, json_path,
         chart_path, job_timeout, quiet, decoder="full", no_compile_cache=False, throughput=False,
         throughput_images=8, peer_python=None, rounds=1):
    from ..manifest import load_manifest
    from . import report, runner

    from .peers import PEERS, PeerRef, check_peer, parse_sources

    if throughput:
        if references or chart_path is not None:
            raise InvalidArgument("--reference and --chart go with the stage benchmark, not --throughput")
        return _run_throughput(model_dir=model_dir, arch=arch, backends=backends, precisions=precisions,
                               variants=variants, device=device, width=width, height=height, steps=steps,
                               warmup=warmup, images=throughput_images, json_path=json_path,
                               rebuild=rebuild, tokenizer_dir=tokenizer_dir)

    if (model_dir is None) == (arch is None):
        raise InvalidArgument("pass either MODEL_DIR (an exported folder) or --arch "
                              "sd15|sd21|sd21-v|sd15-lcm|sd21-turbo|sdxl|sd15-inpaint")
    if (rebuild or tokenizer_dir) and arch is None:
        raise InvalidArgument("--rebuild and --tokenizer go with --arch")
    references = tuple(dict.fromkeys(references))
    if reference_sources and not references:
        raise InvalidArgument("--reference-source goes with --reference")
    if peer_python and "optimum-intel" not in references:
        raise InvalidArgument("--peer-python goes with --reference optimum-intel")
    sources = parse_sources(references, tuple(reference_sources))
    reference = "torch" if "torch" in references else None
    reference_source = (sources.get("torch") or [None])[0]
    peers = [PeerRef(e, src, p, peer_python if e == "optimum-intel" else None)
             for e in references if e in PEERS for src in (sources.get(e) or [None])
             for p in dict.fromkeys(precisions or ("auto",))]
    for p in peers:   # a missing package or an unreadable folder: one line, before any build or measurement
        check_peer(p)
    for p in (json_path, chart_path):
        if p is not None:
            check_writable(p)
    settings = runner.BenchSettings(width=width, height=height, steps=20 if steps is None else steps,
                                    guidance=guidance, threads=threads,
                                    repeat=repeat, warmup=warmup, stages=stages,
                                    prompt=prompt or runner.DEFAULT_PROMPT, decoder=decoder,
                                    compile_cache=not no_compile_cache, rounds=rounds)

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    build = None
    if arch is not None:
        model_dir, build = runner.ensure_arch_model(arch, rebuild=rebuild, tokenizer=tokenizer_dir, log=log)
    m = load_manifest(model_dir, verify="size")
    if ("taesd" in settings.stages or decoder == "taesd") and "taesd_decoder" not in m.components:
        raise InvalidArgument(f"{model_dir} has no tiny autoencoder (taesd_decoder) for the taesd stage or "
                              "--decoder taesd",
                              hint="re-export it with `cpuflow export ... --taesd madebyollin/taesd`")
    configs, notes = runner.make_configs(m, backends or ("openvino",), variants or (None,),
                                         precisions or ("auto",), device)
    for n in notes:
        log(f"note: {n}")
    result = runner.run_bench(model_dir, configs, settings, reference=reference, reference_source=reference_source,
                              arch=arch, show_progress=not quiet, log=log, job_timeout=job_timeout, notes=notes,
                              build_record=build, peers=peers)
    click.echo(report.format_table(result))
    if json_path is not None:
        log(f"wrote {report.write_json(result, json_path)}")
    if chart_path is not None:
        log(f"wrote {report.write_chart(result, chart_path)}")
    if any(st.get("error") for c in result["configs"] for st in c["stages"].values()):
        sys.exit(1)


def _run_throughput(*, model_dir, arch, backends, precisions, variants, device, width, height, steps, warmup, images,
                    json_path, rebuild, tokenizer_dir) -> None:
    """`cpuflow bench --throughput`: one measurement and record per configuration asked for."""
    import json

    from ..manifest import load_manifest
    from . import runner, throughput

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    if json_path is not None:
        check_writable(json_path)
    if arch is not None:
        if model_dir is not None:
            raise InvalidArgument("pass either MODEL_DIR (an exported folder) or --arch, not both")
        model_dir, _ = runner.ensure_arch_model(arch, rebuild=rebuild, tokenizer=tokenizer_dir, log=log)
    if model_dir is None:
        from ..pipelines.model import shipped_model_dir
        model_dir = shipped_model_dir()
    m = load_manifest(model_dir, verify="size")
    configs, notes = runner.make_configs(m, backends or ("openvino",), variants or (None,),
                                         precisions or ("auto",), device)
    for n in notes:
        log(f"note: {n}")
    results = []
    for c in configs:
        rec = throughput.measure(model_dir, backend=c.backend, precision=c.precision, variant=c.variant,
                                 device=c.device, images=images, warmup=warmup, steps=steps, width=width,
                                 height=height, log=log)
        path = throughput.write_record(rec)
        rates = ", ".join(f"{k} worker(s) {v:.1f}" for k, v in rec["images_per_minute"].items())
        load = rec["loadavg_before"]
        when = f" (load average {load[0]:.2f} at the start)" if load else ""
        click.echo(f"{c.id}: images/min: {rates} -> fastest {rec['best']}{when}")
        log(f"recorded in {path}: `cpuflow batch` on this model and machine now runs {rec['best']} worker(s)")
        results.append(rec)
    if json_path is not None:
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps({"schema": throughput.SCHEMA, "results": results}, indent=1), encoding="utf-8")
        tmp.replace(json_path)
        log(f"wrote {json_path}")


def check_writable(path: Path) -> None:
    """Refuse a --json / --chart target the end of the run could not write, before
    anything is measured: the report is written as PATH.tmp beside it, then renamed."""
    if not path.parent.exists():
        raise InvalidArgument(f"folder {path.parent} does not exist (for {path.name})")
    if path.is_dir():
        raise InvalidArgument(f"{path} is a folder; give a file name")
    probe = path.with_name(path.name + ".tmp")
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except FileExistsError:
        pass     # a leftover of an earlier run: it will be replaced
    except OSError as e:
        raise InvalidArgument(f"cannot write {path} ({e.strerror or e})",
                              hint="choose a folder you can write to") from None


if __name__ == "__main__":  # until mounted as `cpuflow bench`: python -m cpuflow.bench.cli ...
    bench_command(prog_name="cpuflow bench")
