#!/usr/bin/env python
"""Regenerate tests/fixtures/samplers/goldens.npz + cases.json from diffusers.

Needs torch and diffusers (the reference); the tests that read the goldens do
not. For every case it runs the diffusers scheduler loop the way
StableDiffusion(Img2Img)Pipeline drives it, with the deterministic fake model
below, and stores:

  {id}__timesteps  the timestep of each model call (float64)
  {id}__final      the final latents (float32)
  {id}__noise      every generator draw in order (initial noise first), float32
  {id}__init       img2img init latents (float32), img2img cases only
  ac__{config}     diffusers' float32 alphas_cumprod for each config

It then runs cpuflow on the same inputs and prints the max difference, so a
regeneration that disagrees with cpuflow is visible at once.

Usage: python scripts/regen_sampler_golden.py [--check]   (--check: compare, write nothing)
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "samplers"
sys.path.insert(0, str(ROOT))

SHAPE = (1, 4, 8, 8)
MODEL_ID = "0.1*tanh(x)*cos(t/300) + 0.05*x, float32"

# id, sampler, config, prediction_type, steps, schedule, strength (None: txt2img), eta, seed
CASES = [
    ("plms_sd15_eps_20_txt", "plms", "sd15", "epsilon", 20, "default", None, 0.0, 1),
    ("plms_sd15_eps_20_img075", "plms", "sd15", "epsilon", 20, "default", 0.75, 0.0, 2),
    ("plms_trailing_v_3_txt", "plms", "trailing", "v_prediction", 3, "default", None, 0.0, 3),
    ("ddim_sd21v_v_20_img075", "ddim", "sd21v", "v_prediction", 20, "default", 0.75, 0.0, 4),
    ("ddim_sd15_eps_7_txt_eta1", "ddim", "sd15", "epsilon", 7, "default", None, 1.0, 5),
    ("euler_sd15_eps_20_txt", "euler", "sd15", "epsilon", 20, "default", None, 0.0, 6),
    ("euler_sd21v_v_7_karras_img03", "euler", "sd21v", "v_prediction", 7, "karras", 0.3, 0.0, 7),
    ("euler_a_sd15_eps_20_txt", "euler_a", "sd15", "epsilon", 20, "default", None, 0.0, 8),
    ("euler_a_trailing_v_4_img075", "euler_a", "trailing", "v_prediction", 4, "default", 0.75, 0.0, 9),
    ("heun_sd15_eps_7_karras_txt", "heun", "sd15", "epsilon", 7, "karras", None, 0.0, 10),
    ("heun_trailing_v_4_img075", "heun", "trailing", "v_prediction", 4, "default", 0.75, 0.0, 11),
    ("dpmpp_2m_sd15_eps_20_txt", "dpmpp_2m", "sd15", "epsilon", 20, "default", None, 0.0, 12),
    ("dpmpp_2m_sd21v_v_20_karras_txt", "dpmpp_2m", "sd21v", "v_prediction", 20, "karras", None, 0.0, 13),
    ("dpmpp_2m_trailing_eps_7_img03", "dpmpp_2m", "trailing", "epsilon", 7, "default", 0.3, 0.0, 14),
    ("lcm_sd15_eps_4_txt", "lcm", "sd15", "epsilon", 4, "default", None, 0.0, 15),
    ("lcm_sd21v_v_4_img075", "lcm", "sd21v", "v_prediction", 4, "default", 0.75, 0.0, 16),
]


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """Keep identical to tests/test_samplers.py::fake_model."""
    x = np.asarray(x, dtype=np.float32)
    return np.float32(0.1) * np.tanh(x) * np.float32(np.cos(t / 300.0)) + x * np.float32(0.05)


def init_latents_for(seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal(SHAPE).astype(np.float32)


def load_configs() -> dict:
    return json.loads((FIXTURES / "configs.json").read_text())


def run_diffusers(case: tuple, configs: dict):
    import diffusers
    import torch

    from cpuflow.samplers import SAMPLERS

    cid, name, cfg_name, pred, steps, schedule, strength, eta, seed = case
    spec = SAMPLERS[name]
    cfg = dict(configs[cfg_name], prediction_type=pred)
    kw = dict(spec.overrides)
    if "use_karras_sigmas" in spec.defaults:
        kw["use_karras_sigmas"] = schedule == "karras"
    sch = getattr(diffusers, spec.diffusers_class).from_config(cfg, **kw)
    g = torch.Generator().manual_seed(seed)
    sch.set_timesteps(steps)
    draws = []
    probe = torch.Generator().manual_seed(seed)  # same stream, to record what diffusers draws
    timesteps = sch.timesteps
    init = None
    if strength is None:
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)
        x = noise * sch.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sch.timesteps[t_start * sch.order :]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        init = init_latents_for(seed)
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)
        x = sch.add_noise(torch.from_numpy(init), noise, timesteps[:1].repeat(SHAPE[0]))
    params = inspect.signature(sch.step).parameters
    extra = {}
    if "generator" in params:
        extra["generator"] = g
    if "eta" in params:
        extra["eta"] = eta
    calls = []
    for t in timesteps:
        x_in = sch.scale_model_input(x, t)
        calls.append(float(t))
        out = torch.from_numpy(fake_model(x_in.numpy(), float(t)))
        x = sch.step(out, t, x, **extra, return_dict=False)[0]
    # every draw the loop made, in order: replay the same stream until it catches up with g
    n_draws = 0
    while not torch.equal(probe.get_state(), g.get_state()):
        draws.append(torch.randn(SHAPE, generator=probe, dtype=torch.float32).numpy())
        n_draws += 1
        if n_draws > 10 * len(calls) + 10:
            raise RuntimeError(f"{cid}: could not replay the generator stream")
    return np.array(calls, dtype=np.float64), x.numpy().astype(np.float32), np.stack(draws), init


def run_cpuflow(case: tuple, configs: dict, draws: np.ndarray, init):
    from cpuflow import samplers as S

    cid, name, cfg_name, pred, steps, schedule, strength, eta, seed = case
    cfg = dict(configs[cfg_name], prediction_type=pred)
    plan = S.make_plan(name, cfg, steps, schedule=schedule, strength=1.0 if strength is None else strength)
    it = iter(draws)

    class Replay:
        def randn(self, shape):
            return next(it)

    gen = Replay()
    x = S.initial_latents(plan, gen.randn(SHAPE), init)
    x = S.sample(plan, fake_model, x, generator=gen, eta=eta)
    return plan.timesteps, x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only, write nothing")
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    configs = load_configs()
    arrays: dict[str, np.ndarray] = {}
    manifest = {"model": MODEL_ID, "shape": list(SHAPE), "cases": []}
    worst = 0.0
    for case in CASES:
        cid, name, cfg_name, pred, steps, schedule, strength, eta, seed = case
        ts, final, draws, init = run_diffusers(case, configs)
        ots, ox = run_cpuflow(case, configs, draws, init)
        diff = float(np.max(np.abs(ox - final)) / max(1.0, float(np.max(np.abs(final)))))
        worst = max(worst, diff)
        ts_ok = len(ots) == len(ts) and np.allclose(ots, ts, rtol=5e-7, atol=0)
        print(f"{cid:34s} calls={len(ts):3d} draws={len(draws):3d} rel.diff={diff:.2e} timesteps={'ok' if ts_ok else 'DIFFER'}")
        arrays[f"{cid}__timesteps"] = ts
        arrays[f"{cid}__final"] = final
        arrays[f"{cid}__noise"] = draws.astype(np.float32)
        if init is not None:
            arrays[f"{cid}__init"] = init
        manifest["cases"].append(
            {
                "id": cid, "sampler": name, "config": cfg_name, "prediction_type": pred, "steps": steps,
                "schedule": schedule, "strength": strength, "eta": eta, "seed": seed,
            }
        )
    import diffusers
    import torch

    for cfg_name, cfg in configs.items():
        sch = diffusers.DDIMScheduler.from_config(cfg)
        arrays[f"ac__{cfg_name}"] = sch.alphas_cumprod.numpy().astype(np.float32)
    manifest["diffusers_version"] = diffusers.__version__
    manifest["torch_version"] = torch.__version__
    print(f"worst relative difference cpuflow vs diffusers: {worst:.2e}")
    if args.check:
        return 0 if worst < 1e-4 else 1
    np.savez_compressed(FIXTURES / "goldens.npz", **arrays)
    (FIXTURES / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {FIXTURES / 'goldens.npz'} and cases.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
