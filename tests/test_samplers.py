"""Sampling loops (cpuflow/samplers.py, cpuflow/denoiser.py).

Tier 1 (numpy only): registry, plan validation and errors, API behaviour, and
goldens — diffusers' own final latents for a set of cases, stored by
scripts/regen_sampler_golden.py together with every generator draw, replayed here.
Tier 2 (needs torch + diffusers): scheduler-level parity. The diffusers loop
(``XScheduler.from_config(cfg, **overrides)``, ``set_timesteps``,
``init_noise_sigma`` / ``get_timesteps`` + ``add_noise``, ``scale_model_input``,
``step(..., generator=torch.Generator)``) and cpuflow run the same fake model
(a smooth nonlinear numpy function of x and t) on the same noise.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpuflow import denoiser
from cpuflow import samplers as S
from cpuflow.errors import BackendError, InvalidArgument

# diffusers + numpy 2 warn on every torch-tensor-to-array conversion inside the schedulers
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
FIXTURES = Path(__file__).parent / "fixtures" / "samplers"
CONFIGS = json.loads((FIXTURES / "configs.json").read_text())
SD15, SD21V, TRAILING = CONFIGS["sd15"], CONFIGS["sd21v"], CONFIGS["trailing"]
SHAPE = (1, 4, 8, 8)
TOL = 1e-4  # max |diff| / max(1, max |reference|)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """Keep identical to scripts/regen_sampler_golden.py::fake_model."""
    x = np.asarray(x, dtype=np.float32)
    return np.float32(0.1) * np.tanh(x) * np.float32(np.cos(t / 300.0)) + x * np.float32(0.05)


class NumpyGen:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def randn(self, shape):
        self.calls += 1
        return self.rng.standard_normal(shape).astype(np.float32)


class ReplayGen:
    """Serves recorded draws in order; fails on a wrong shape or one draw too many."""

    def __init__(self, draws: np.ndarray):
        self.draws = list(draws)
        self.used = 0

    def randn(self, shape):
        assert self.used < len(self.draws), "drew more noise than diffusers did"
        d = self.draws[self.used]
        assert tuple(shape) == d.shape
        self.used += 1
        return d


def rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def run(name, cfg, steps, *, schedule="default", strength=1.0, gen=None, init=None, eta=0.0, callback=None):
    plan = S.make_plan(name, cfg, steps, schedule=schedule, strength=strength)
    gen = gen or NumpyGen(0)
    x = S.initial_latents(plan, gen.randn(SHAPE), init)
    return plan, S.sample(plan, fake_model, x, generator=gen, eta=eta, callback=callback)


# --- tier 1: registry, plans, errors -----------------------------------------------------
def test_registry():
    assert list(S.SAMPLERS) == ["ddim", "plms", "euler", "euler_a", "heun", "dpmpp_2m", "lcm"]
    assert S.KARRAS_SAMPLERS == ("euler", "heun", "dpmpp_2m")
    for name, spec in S.SAMPLERS.items():
        assert spec.name == name and spec.description and spec.model_calls_per_step in (1, 2)
    assert S.SAMPLERS["euler_a"].ancestral and S.SAMPLERS["euler_a"].stochastic
    assert S.SAMPLERS["lcm"].stochastic and not S.SAMPLERS["euler"].stochastic
    assert S.SAMPLERS["ddim"].accepts_eta and S.SAMPLERS["heun"].order == 2


@pytest.mark.parametrize(
    "name,steps,calls",
    [("ddim", 20, 20), ("plms", 20, 21), ("plms", 1, 1), ("euler", 7, 7), ("heun", 7, 13), ("heun", 1, 1),
     ("dpmpp_2m", 5, 5), ("lcm", 4, 4), ("euler_a", 3, 3)],
)
def test_plan_model_calls(name, steps, calls):
    plan = S.make_plan(name, SD15, steps)
    assert plan.n_model_calls == calls == len(plan.timesteps)
    assert plan.timesteps.dtype == np.float64 and not plan.timesteps.flags.writeable
    assert np.array_equal(plan.timesteps, plan.timesteps.astype(np.float32).astype(np.float64))
    assert plan.sampler == name and plan.steps == steps and plan.begin_index == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 3  # type: ignore[misc]


def test_plan_img2img_slicing():
    p = S.make_plan("euler", SD15, 20, strength=0.75)  # init_timestep 15, t_start 5
    assert p.begin_index == 5 and p.n_model_calls == 15 and p.denoise_steps == 15
    assert np.array_equal(p.timesteps, p.schedule_timesteps[5:])
    h = S.make_plan("heun", SD15, 20, strength=0.3)  # 6 steps left, order 2
    assert h.begin_index == 28 and h.n_model_calls == 11
    pl = S.make_plan("plms", SD15, 20, strength=0.5)
    assert pl.n_model_calls == 11  # timesteps[10:] of the 21-long PLMS list


def test_sd_specific_values():
    ddim = S.make_plan("ddim", SD15, 20)
    assert ddim.timesteps.tolist() == list(range(951, 0, -50))  # leading + steps_offset
    assert ddim.final_alpha_cumprod == ddim.alphas_cumprod[0]  # set_alpha_to_one false
    plms = S.make_plan("plms", SD15, 4)
    assert plms.timesteps.tolist() == [751, 501, 501, 251, 1]
    eul = S.make_plan("euler", SD15, 20)  # EulerDiscreteScheduler defaults to linspace spacing
    assert eul.timesteps[0] == 999 and eul.timesteps[-1] == 0
    assert eul.init_noise_sigma == pytest.approx(14.6146, abs=1e-3)
    lead = S.make_plan("euler", dict(SD15, timestep_spacing="leading"), 20)
    s0 = float(lead.sigmas[0])
    assert lead.init_noise_sigma == pytest.approx((s0**2 + 1) ** 0.5, rel=1e-6)
    dpm = S.make_plan("dpmpp_2m", SD15, 20)
    assert dpm.sigmas[-1] == 0 and dpm.init_noise_sigma == 1.0
    assert S.make_plan("lcm", SD15, 4).timesteps.tolist() == [999, 759, 499, 259]
    assert S.make_plan("ddim", SD15, 4).config["clip_sample"] is False
    assert S.make_plan("ddim", {}, 4).config["clip_sample"] is True  # DDIMScheduler's default


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("dpm2", SD15, 20), {}, r"sampler 'dpm2' is not known; valid samplers: ddim, plms, euler, euler_a, heun"),
        (("euler", SD15, 0), {}, r"steps=0 is out of range; steps must be from 1 to 1000"),
        (("euler", SD15, 1001), {}, r"steps=1001"),
        (("euler", SD15, 2.5), {}, r"steps=2.5 is not an integer"),
        (("euler", SD15, 20), {"strength": 1.5}, r"strength=1.5 is out of range; strength must be between 0 and 1"),
        (("euler", SD15, 20), {"strength": -0.1}, r"strength=-0.1"),
        (("euler", SD15, 20), {"strength": 0.01},
         r"strength 0.01 with 20 steps leaves no denoising step; use strength >= 0.05"),
        (("euler", SD15, 20), {"schedule": "exponential"}, r"schedule 'exponential' is not known; valid schedules: default, karras, uniform"),
        (("ddim", SD15, 20), {"schedule": "karras"},
         r"schedule 'karras' is not supported by sampler 'ddim'; samplers that support karras: euler, heun, dpmpp_2m"),
        (("euler_a", SD15, 20), {"schedule": "karras"}, r"not supported by sampler 'euler_a'"),
        (("lcm", SD15, 51), {}, r"steps=51 is too many for sampler 'lcm'.*original_inference_steps=50"),
        (("ddim", TRAILING, 61), {}, r"steps=61 with timestep_spacing 'trailing'.*62 timesteps.*use 60 or 62 steps"),
        (("ddim", SD15, 1000), {}, r"timestep 1000, outside the trained range 0..999; use 999 steps"),
        (("euler_a", dict(SD15, prediction_type="sample"), 4), {}, r"prediction_type='sample' is not supported by sampler 'euler_a'"),
        (("ddim", dict(SD15, thresholding=True), 4), {}, r"thresholding=True is not supported"),
        (("euler", dict(SD15, interpolation_type="log_linear"), 4), {}, r"interpolation_type='log_linear'"),
        (("ddim", [("beta_start", 0.1)], 4), {}, r"scheduler_config must be a mapping"),
    ],
)
def test_plan_errors(args, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        S.make_plan(*args, **kwargs)


def test_config_resolution_like_from_config():
    # keys the class does not take are ignored (PNDM/Heun have no rescale_betas_zero_snr) ...
    cfg = dict(SD15, rescale_betas_zero_snr=True, thresholding=True)
    assert S.make_plan("heun", cfg, 4).alphas_cumprod[-1] > 0
    assert S.make_plan("plms", cfg, 4).alphas_cumprod[-1] > 0
    # ... but they stay on the config, and Heun / DPM read sigma_min / sigma_max from there
    p = S.make_plan("heun", dict(SD15, sigma_min=0.1, sigma_max=10.0), 4, schedule="karras")
    assert float(p.sigmas[0]) == pytest.approx(10.0) and p.config["sigma_max"] == 10.0
    # _use_default_values: listed keys keep the class default
    p = S.make_plan("ddim", dict(SD15, _use_default_values=["steps_offset"]), 20)
    assert p.timesteps[0] == 950
    # schedule='default' keeps the model config's karras setting; 'uniform' turns it off
    p = S.make_plan("euler", dict(SD15, use_karras_sigmas=True), 20)
    assert p.config["use_karras_sigmas"] is True
    p = S.make_plan("euler", dict(SD15, use_karras_sigmas=True), 20, schedule="uniform")
    assert p.config["use_karras_sigmas"] is False
    assert p.schedule_timesteps[1] == np.float32(999 * 18 / 19)


def test_sample_errors_and_callback():
    plan = S.make_plan("euler", SD15, 4)
    x = S.initial_latents(plan, NumpyGen(0).randn(SHAPE))
    with pytest.raises(InvalidArgument, match=r"eta=0.5 applies only to sampler 'ddim'"):
        S.sample(plan, fake_model, x, generator=None, eta=0.5)
    with pytest.raises(InvalidArgument, match=r"eta=2 is out of range"):
        S.sample(S.make_plan("ddim", SD15, 4), fake_model, x, generator=NumpyGen(), eta=2)
    with pytest.raises(InvalidArgument, match=r"sampler 'euler_a' draws noise while sampling; pass a generator"):
        S.sample(S.make_plan("euler_a", SD15, 4), fake_model, x, generator=None)
    with pytest.raises(BackendError, match=r"the model returned shape \(1, 4, 8\)"):
        S.sample(plan, lambda x_in, t: x_in[:, :, 0], x, generator=None)

    seen = []

    def cb(i, n, lat, x0):
        seen.append((i, n, lat.shape, None if x0 is None else x0.shape))

    S.sample(plan, fake_model, x, generator=None, callback=cb)
    assert seen == [(i, 4, SHAPE, SHAPE) for i in range(4)]
    seen.clear()
    S.sample(S.make_plan("plms", SD15, 3), fake_model, x, generator=None, callback=cb)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][3] is None

    class Stop(Exception):
        pass

    def cancel(i, n, lat, x0):
        if i == 1:
            raise Stop

    calls = []
    with pytest.raises(Stop):
        S.sample(plan, lambda x_in, t: calls.append(t) or fake_model(x_in, t), x, generator=None, callback=cancel)
    assert len(calls) == 2
    assert np.array_equal(x, S.initial_latents(plan, NumpyGen(0).randn(SHAPE))), "input latents untouched"


def test_initial_latents_errors():
    plan = S.make_plan("ddim", SD15, 20, strength=0.5)
    with pytest.raises(InvalidArgument, match=r"strength=0.5 needs init_latents"):
        S.initial_latents(plan, np.zeros(SHAPE, np.float32))
    with pytest.raises(InvalidArgument, match=r"init_latents shape \(1, 4, 8, 4\) does not match noise shape"):
        S.initial_latents(plan, np.zeros(SHAPE, np.float32), np.zeros((1, 4, 8, 4), np.float32))


def test_stateless_and_deterministic():
    plan = S.make_plan("dpmpp_2m", SD15, 8)
    a = run("dpmpp_2m", SD15, 8)[1]
    b = S.sample(plan, fake_model, S.initial_latents(plan, NumpyGen(0).randn(SHAPE)), generator=None)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    # ancestral samplers use the generator, so different seeds differ
    a1 = run("euler_a", SD15, 5, gen=NumpyGen(1))[1]
    a2 = run("euler_a", SD15, 5, gen=NumpyGen(2))[1]
    assert not np.allclose(a1, a2)


def test_denoiser_parametrisations_agree():
    # the same (x0, eps) pair expressed in each parametrisation gives x0 back
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    a = np.float32(0.3)
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    for pred, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got_x0, got_eps = denoiser.vp_x0_eps(out, xt, a, pred)
        assert np.allclose(got_x0, x0, atol=1e-5) and np.allclose(got_eps, eps, atol=1e-5)
        sigma = np.float32(np.sqrt((1 - a) / a))
        assert np.allclose(denoiser.ve_x0(out, xt / np.sqrt(a), sigma, pred), x0, atol=1e-5)
        assert np.allclose(denoiser.vp_sigma_x0(out, xt, sigma, pred), x0, atol=1e-5)
    with pytest.raises(InvalidArgument, match="prediction_type 'flow'"):
        denoiser.ve_x0(eps, xt, np.float32(1), "flow")


def test_cpuflow_sampling_does_not_import_torch():
    code = (
        "import sys; import cpuflow.samplers, cpuflow.schedules, cpuflow.denoiser; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- tier 1: goldens (diffusers' numbers, no torch needed) ----------------------------------
_MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
_GOLD = np.load(FIXTURES / "goldens.npz")


def _expected_draws(case: dict, plan: S.SamplingPlan) -> int:
    n = plan.n_model_calls
    if case["sampler"] == "euler_a" or (case["sampler"] == "ddim" and case["eta"] > 0):
        return 1 + n
    if case["sampler"] == "lcm":
        return n  # initial noise + one per call except the last
    return 1


@pytest.mark.parametrize("case", _MANIFEST["cases"], ids=[c["id"] for c in _MANIFEST["cases"]])
def test_golden(case):
    cid = case["id"]
    cfg = dict(CONFIGS[case["config"]], prediction_type=case["prediction_type"])
    strength = 1.0 if case["strength"] is None else case["strength"]
    plan = S.make_plan(case["sampler"], cfg, case["steps"], schedule=case["schedule"], strength=strength)
    ref_ts = _GOLD[f"{cid}__timesteps"]
    fractional = case["sampler"] in ("euler", "heun") and case["schedule"] == "karras"
    if fractional:  # sigma_to_t on torch's float32 sigma table: may differ by 1 float32 ulp
        np.testing.assert_allclose(plan.timesteps, ref_ts, rtol=5e-7, atol=0)
    else:
        assert np.array_equal(plan.timesteps, ref_ts)
    gen = ReplayGen(_GOLD[f"{cid}__noise"])
    init = _GOLD[f"{cid}__init"] if f"{cid}__init" in _GOLD else None
    x = S.initial_latents(plan, gen.randn(SHAPE), init)
    x = S.sample(plan, fake_model, x, generator=gen, eta=case["eta"])
    assert gen.used == len(gen.draws) == _expected_draws(case, plan)
    assert rel_diff(x, _GOLD[f"{cid}__final"]) < TOL


# --- tier 2: parity with diffusers --------------------------------------------------------
def _diffusers():
    d = pytest.importorskip("diffusers")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    return d


class TorchGen:
    """Stand-in for cpuflow.rng: torch.randn(shape, generator=g, dtype=float32), as randn_tensor on CPU."""

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, shape):
        return self.torch.randn(tuple(shape), generator=self.g, dtype=self.torch.float32).numpy()


def diffusers_run(name, cfg, steps, *, schedule="default", strength=None, eta=0.0, seed=0, init=None, x0_log=None):
    """The StableDiffusion(Img2Img)Pipeline loop around a diffusers scheduler."""
    d = _diffusers()
    import torch

    spec = S.SAMPLERS[name]
    kw = dict(spec.overrides)
    if "use_karras_sigmas" in spec.defaults:
        kw["use_karras_sigmas"] = schedule == "karras"
    sch = getattr(d, spec.diffusers_class).from_config(cfg, **kw)
    g = torch.Generator().manual_seed(seed)
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    if strength is None:
        x = torch.randn(SHAPE, generator=g, dtype=torch.float32) * sch.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sch.timesteps[t_start * sch.order :]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)
        x = sch.add_noise(torch.from_numpy(init), noise, timesteps[:1].repeat(SHAPE[0]))
    params = inspect.signature(sch.step).parameters
    extra = {k: v for k, v in (("generator", g), ("eta", eta)) if k in params}
    calls = []
    for t in timesteps:
        x_in = sch.scale_model_input(x, t)
        calls.append(float(t))
        out = sch.step(torch.from_numpy(fake_model(x_in.numpy(), float(t))), t, x, **extra, return_dict=True)
        x = out.prev_sample
        if x0_log is not None:
            x0_log.append(getattr(out, "pred_original_sample", None) if name != "lcm" else out.denoised)
    return np.array(calls), x.numpy()


def compare(name, cfg, steps, *, schedule="default", strength=None, eta=0.0, seed=0):
    init = None if strength is None else np.random.default_rng(seed + 100).standard_normal(SHAPE).astype(np.float32)
    ref_ts, ref = diffusers_run(name, cfg, steps, schedule=schedule, strength=strength, eta=eta, seed=seed, init=init)
    plan, ours = run(name, cfg, steps, schedule=schedule, strength=1.0 if strength is None else strength,
                     gen=TorchGen(seed), init=init, eta=eta)
    what = f"{name} {schedule} steps={steps} strength={strength} eta={eta}"
    assert len(plan.timesteps) == len(ref_ts), what
    if name in ("euler", "heun") and schedule == "karras":  # 1-ulp float32 timesteps, see test_golden
        np.testing.assert_allclose(plan.timesteps, ref_ts, rtol=5e-7, atol=0, err_msg=what)
    else:
        assert np.array_equal(plan.timesteps, ref_ts), what
    d = rel_diff(ours, ref)
    assert d < TOL, f"{what}: relative difference {d:.2e}"
    return d


PARITY_STEPS = (1, 2, 3, 4, 7, 20)
PARITY_STRENGTHS = (None, 0.3, 0.75, 1.0)  # None: txt2img


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cfg_name", ["sd15", "sd21v", "trailing"])
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_parity_with_diffusers(name, cfg_name, pred):
    _diffusers()
    cfg = dict(CONFIGS[cfg_name], prediction_type=pred)
    schedules = ("default", "karras") if S.SAMPLERS[name].supports_karras else ("default",)
    worst = 0.0
    for schedule in schedules:
        for steps in PARITY_STEPS:
            for strength in PARITY_STRENGTHS:
                if strength is not None and int(steps * strength) < 1:
                    continue
                worst = max(worst, compare(name, cfg, steps, schedule=schedule, strength=strength, seed=steps))
    print(f"{name} {cfg_name} {pred}: worst relative difference {worst:.2e}")


_EXTRA = [
    # (sampler, config overrides, steps, schedule, strength, eta)
    ("ddim", {}, 10, "default", None, 1.0),
    ("ddim", {}, 10, "default", 0.6, 0.5),
    ("ddim", {"timestep_spacing": "linspace"}, 9, "default", None, 0.0),
    ("ddim", {"clip_sample": True, "clip_sample_range": 0.5}, 6, "default", None, 0.0),
    ("ddim", {"prediction_type": "sample"}, 5, "default", 0.5, 0.0),
    ("ddim", {"set_alpha_to_one": True}, 5, "default", None, 0.0),
    ("ddim", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     8, "default", None, 0.0),
    ("plms", {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"}, 9, "default", None, 0.0),
    ("plms", {}, 50, "default", 0.9, 0.0),
    ("euler", {"prediction_type": "sample"}, 5, "default", None, 0.0),
    ("euler", {"timestep_spacing": "leading"}, 12, "karras", 0.6, 0.0),
    ("euler", {"final_sigmas_type": "sigma_min", "sigma_min": 0.1, "sigma_max": 10.0}, 6, "karras", None, 0.0),
    ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 30, "default", None, 0.0),
    ("euler_a", {"timestep_spacing": "leading"}, 9, "default", 0.5, 0.0),
    ("heun", {"prediction_type": "sample", "clip_sample": True}, 5, "default", None, 0.0),
    ("heun", {"sigma_min": 0.1, "sigma_max": 10.0}, 5, "karras", None, 0.0),  # hidden config keys
    ("heun", {"timestep_spacing": "leading"}, 10, "default", 0.5, 0.0),
    ("dpmpp_2m", {"solver_type": "heun"}, 12, "default", None, 0.0),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 20, "default", None, 0.0),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 16, "default", None, 0.0),
    ("dpmpp_2m", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 8, "default", None, 0.0),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}, 10, "default", None, 0.0),
    ("dpmpp_2m", {"timestep_spacing": "leading"}, 30, "karras", 0.5, 0.0),
    ("dpmpp_2m", {"sigma_min": 0.1, "sigma_max": 10.0}, 6, "karras", None, 0.0),
    ("dpmpp_2m", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     8, "default", None, 0.0),
    ("dpmpp_2m", {"prediction_type": "sample"}, 5, "default", None, 0.0),
    ("lcm", {"original_inference_steps": 30, "timestep_scaling": 5.0}, 6, "default", None, 0.0),
    ("lcm", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 4, "default", 0.5, 0.0),
    ("lcm", {"prediction_type": "sample", "clip_sample": True}, 3, "default", None, 0.0),
]


@pytest.mark.parametrize("case", _EXTRA, ids=[f"{c[0]}-{i}" for i, c in enumerate(_EXTRA)])
def test_parity_config_variants(case):
    _diffusers()
    name, overrides, steps, schedule, strength, eta = case
    compare(name, dict(SD15, **overrides), steps, schedule=schedule, strength=strength, eta=eta, seed=7)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "heun", "lcm"])
def test_callback_x0_matches_diffusers(name):
    _diffusers()
    log: list = []
    diffusers_run(name, SD21V, 6, x0_log=log, seed=3)
    seen = []
    run(name, SD21V, 6, gen=TorchGen(3), callback=lambda i, n, x, x0: seen.append(x0))
    assert len(seen) == len(log)
    for ours, ref in zip(seen, log):
        assert rel_diff(ours, ref.numpy()) < TOL


def test_diffusers_still_has_the_quirks_we_refuse():
    """If diffusers fixes these, cpuflow's refusals can be relaxed."""
    d = _diffusers()
    sch = d.DDIMScheduler.from_config(TRAILING)
    sch.set_timesteps(61)
    assert len(sch.timesteps) == 62 and int(sch.timesteps[-1]) == -1
    dpm = d.DPMSolverMultistepScheduler.from_config(dict(SD15, timestep_spacing="linspace"))
    dpm.set_timesteps(1000)
    assert len(set(dpm.timesteps.tolist())) < 1000


def test_defaults_table_matches_diffusers_signatures():
    d = _diffusers()
    for spec in S.SAMPLERS.values():
        params = inspect.signature(getattr(d, spec.diffusers_class).__init__).parameters
        want = {k: p.default for k, p in params.items() if k != "self"}
        assert dict(spec.defaults) == want, spec.diffusers_class
