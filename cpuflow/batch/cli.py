"""`cpuflow batch`: the command line over :func:`cpuflow.batch.run`."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..config import RESIZE_MODES

EXAMPLES = """
\b
Examples:
  # jobs.jsonl: one JSON object a line, the fields of POST /api/generate (+ init_image_path)
  #   {"prompt": "a red circle on a blue background", "seed": 1, "steps": 20}
  cpuflow batch jobs.jsonl --out out/
  cpuflow batch --prompts prompts.txt --seeds 0..99 --steps 20 --model exported/sd15 --out out/
  cpuflow bench --throughput exported/sd15      # once per machine: then batch runs the fastest worker count
  cpuflow batch jobs.jsonl --out out/ --ray auto                  # on the Ray cluster of `ray start`
  cpuflow batch jobs.jsonl --out out/ --ray ray://head:10001 --cpus-per-worker 8
\b
Kill it at any moment and run the same command again: it finishes what is missing.
"""


def _workers_option(ctx, param, value):
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 4096:
        raise click.BadParameter(f"must be auto or a whole number from 1 to 4096, got {value!r}")
    return n


@click.command("batch", epilog=EXAMPLES)
@click.argument("jobs", type=click.Path(path_type=Path), required=False)
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Output folder: images/, results.jsonl, journal.jsonl (resumed when it exists).")
@click.option("--model", "-m", type=click.Path(path_type=Path), default=None,
              help="Exported model folder (default: the model shipped with cpuflow).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="A text file, one prompt a line (instead of JOBS); other parameters from the options below.")
@click.option("--seeds", default=None, metavar="A..B",
              help="Make every job without its own seed once per seed A..B (inclusive).")
@click.option("--negative-prompt", "-n", default=None, help="--prompts: the negative prompt.")
@click.option("--steps", type=int, default=None, help="--prompts: denoising steps (default: the model's).")
@click.option("--sampler", default=None, help="--prompts: sampler (default: the model's).")
@click.option("--schedule", type=click.Choice(["default", "karras"]), default=None, help="--prompts: schedule.")
@click.option("--guidance", "-g", type=float, default=None, help="--prompts: guidance scale.")
@click.option("--width", "-W", type=int, default=None, help="--prompts: width.")
@click.option("--height", "-H", type=int, default=None, help="--prompts: height.")
@click.option("--init-image", default=None, help="--prompts: img2img from this image file.")
@click.option("--strength", type=float, default=None, help="--prompts: img2img strength.")
@click.option("--resize", type=click.Choice(list(RESIZE_MODES)), default=None,
              help="--prompts: how the init image is brought to the size (as `cpuflow generate --resize`; "
                   "default crop).")
@click.option("--decoder", type=click.Choice(["full", "taesd"]), default=None, help="--prompts: decoder.")
@click.option("--ray", "ray_address", default=None, metavar="auto|ray://HOST:PORT",
              help="Run on a Ray cluster (needs `pip install 'cpuflow[ray]'`).")
@click.option("--workers", default="auto", show_default=True, metavar="auto|N", callback=_workers_option,
              help="Local worker processes, each with its own copy of the model and cores / N threads; auto: "
                   "the count `cpuflow bench --throughput` measured fastest for this model on this machine, "
                   "else 1 (the line `workers: ...` says which and why). With --ray: actors (auto: the "
                   "cluster's CPUs / --cpus-per-worker).")
@click.option("--cpus-per-worker", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Ray: CPUs (and threads) per actor.")
@click.option("--model-transfer", type=click.Choice(["auto", "shared", "ship"]), default="auto", show_default=True,
              help="Ray: read the model from a path every node sees (shared), or copy it once per node through "
                   "the object store into the node's cache (ship); auto: shared where the node sees it.")
@click.option("--model-uri", default=None, metavar="URI",
              help="Ray: each node fetches a tar archive of the model folder from here (file://, http(s)://) "
                   "into its cache, checked against --model's manifest sha256.")
@click.option("--retry-failed", is_flag=True, help="Run jobs that failed in an earlier run again.")
@click.option("--backend", type=click.Choice(["openvino", "onnxruntime"]), default="openvino")
@click.option("--precision", type=click.Choice(["auto", "bf16", "f32"]), default="auto")
@click.option("--variant", default=None, help="Model variant (fp32, int8, ...).")
@click.option("--threads", type=int, default=None, help="Threads per worker (default: cores / workers).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def batch_command(jobs, out, model, prompts, seeds, negative_prompt, steps, sampler, schedule, guidance, width,
                  height, init_image, strength, resize, decoder, ray_address, workers, cpus_per_worker, model_transfer,
                  model_uri, retry_failed, backend, precision, variant, threads, quiet):
    """Generate many images from JOBS (a JSONL file) or --prompts, resumably, exactly once."""
    from ..errors import InvalidArgument
    from .runner import run

    if init_image is not None:   # a path typed on the command line is relative to here, not to the prompts file
        init_image = str(Path(init_image).expanduser().resolve())
    flags = {"negative_prompt": negative_prompt, "steps": steps, "sampler": sampler, "schedule": schedule,
             "guidance": guidance, "width": width, "height": height, "init_image_path": init_image,
             "strength": strength, "resize": resize, "decoder": decoder}
    params = {k: v for k, v in flags.items() if v is not None}
    if params and prompts is None:
        flag = "--" + next(iter(params)).replace("_path", "").replace("_", "-")
        raise InvalidArgument(f"{flag} is for --prompts; "
                              "in a jobs file each line carries its own parameters")
    if ray_address is not None:
        from .ray_pool import import_ray
        import_ray(ray_address)     # one clear line before any work when Ray (or its client) is missing
    bar = _Progress(quiet)
    try:
        summary = run(jobs, out=out, model=model, prompts=prompts, seeds=seeds, params=params, ray=ray_address,
                      workers=workers, cpus_per_worker=cpus_per_worker, model_transfer=model_transfer,
                      model_uri=model_uri, retry_failed=retry_failed, backend=backend, precision=precision,
                      variant=variant, threads=threads, progress=bar)
    finally:
        bar.close()
    for source, error in summary.errors[:10]:
        click.echo(f"failed: {source}: {error}", err=True)
    if len(summary.errors) > 10:
        click.echo(f"... and {summary.failed - 10} more failures in {out / 'results.jsonl'}", err=True)
    click.echo(summary.line(), err=True)
    if summary.interrupted:
        click.echo("rerun the same command to finish the rest", err=True)
        sys.exit(130)
    if summary.failed or summary.failed_before:
        sys.exit(1)


class _Progress:
    """images done / total, images per minute, time left (a tqdm bar on stderr)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.t0 = None
        self.n_run = 0

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "warning":
            self._write(f"warning: {ev['message']}")
        elif kind == "note":
            self._write(ev["message"])
        elif kind == "start" and not self.quiet:
            from tqdm import tqdm
            finished = ev["done_before"] + ev["failed_before"]
            self.bar = tqdm(total=ev["total"], initial=finished, unit="img", file=sys.stderr, dynamic_ncols=True,
                            disable=None, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} images [{elapsed}<"
                                                     "{remaining}{postfix}]")
        elif kind in ("image", "failed") and self.bar is not None:
            if self.t0 is None:
                self.t0 = time.perf_counter()
            else:
                self.n_run += 1    # rate from the second image on: the first one paid the model compile
                dt = time.perf_counter() - self.t0
                self.bar.set_postfix_str(f"{60 * self.n_run / dt:.1f} img/min", refresh=False)
            self.bar.update(1)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            click.echo(text, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
