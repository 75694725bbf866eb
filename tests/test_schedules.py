"""Noise schedules and timestep spacings (cpuflow/schedules.py).

Tier 1 (numpy only): properties, known values, and diffusers' alphas_cumprod
stored in tests/fixtures/samplers/goldens.npz (scripts/regen_sampler_golden.py).
Tier 2 (needs torch + diffusers): the same numbers straight from diffusers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpuflow.errors import InvalidArgument
from cpuflow.schedules import (
    NoiseSchedule,
    dpm_timesteps,
    karras_sigmas,
    lcm_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_to_t,
    spaced_timesteps,
    torch_linspace_f32,
)

# diffusers + numpy 2 warn on every torch-tensor-to-array conversion inside the schedulers
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
FIXTURES = Path(__file__).parent / "fixtures" / "samplers"
CONFIGS = json.loads((FIXTURES / "configs.json").read_text())
SD15 = CONFIGS["sd15"]


def _diffusers():
    d = pytest.importorskip("diffusers")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    return d


# --- tier 1: numpy only ----------------------------------------------------------------
def test_torch_linspace_endpoints_and_small_sizes():
    a = torch_linspace_f32(0.1, 0.7, 7)
    assert a.dtype == np.float32
    assert a[0] == np.float32(0.1) and a[-1] == np.float32(0.7)
    assert np.all(np.diff(a) > 0)
    assert torch_linspace_f32(0.5, 2.0, 1).tolist() == [0.5]
    assert torch_linspace_f32(0.5, 2.0, 2).tolist() == [0.5, 2.0]
    assert torch_linspace_f32(0.5, 2.0, 0).size == 0


def test_sd15_schedule_known_values():
    s = NoiseSchedule.from_config(SD15)
    ac = s.alphas_cumprod
    assert ac.dtype == np.float64 and ac.shape == (1000,)
    assert np.array_equal(ac, ac.astype(np.float32).astype(np.float64)), "values must be float32-exact"
    assert not ac.flags.writeable
    assert ac[0] == np.float32(1 - np.float32(0.00085))
    assert np.all(np.diff(ac) < 0)
    assert abs(ac[-1] - 0.0046601) < 1e-6
    sig = s.sigmas
    assert sig.dtype == np.float32
    assert abs(float(sig[-1]) - 14.6146) < 1e-3 and abs(float(sig[0]) - 0.029167) < 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_alphas_cumprod_equal_stored_diffusers_values(name):
    ref = np.load(FIXTURES / "goldens.npz")[f"ac__{name}"]
    ours = NoiseSchedule.from_config(CONFIGS[name]).alphas_cumprod
    assert np.array_equal(ours.astype(np.float32), ref)


def test_beta_schedules_and_errors():
    for bs in ("linear", "scaled_linear", "squaredcos_cap_v2", "exp"):
        b = make_betas(1000, 0.00085, 0.012, bs)
        assert b.dtype == np.float32 and b.shape == (1000,) and np.all(b > 0) and np.all(b < 1)
    b = make_betas(10, 0, 0, "linear", trained_betas=[0.1] * 10)
    assert np.allclose(b, 0.1)
    with pytest.raises(InvalidArgument, match="beta_schedule 'cubic'"):
        make_betas(1000, 0.1, 0.2, "cubic")
    with pytest.raises(InvalidArgument, match="trained_betas has 10 values but num_train_timesteps is 1000"):
        NoiseSchedule.from_config({"trained_betas": [0.01] * 10, "num_train_timesteps": 1000})
    with pytest.raises(InvalidArgument, match="num_train_timesteps"):
        NoiseSchedule.from_config({"num_train_timesteps": 0})


def test_zero_terminal_snr():
    betas = make_betas(1000, 0.00085, 0.012, "scaled_linear")
    rb = rescale_zero_terminal_snr(betas)
    assert rb.dtype == np.float32 and rb[-1] == 1.0
    s = NoiseSchedule.from_config(dict(SD15, rescale_betas_zero_snr=True))
    assert s.alphas_cumprod[-1] == 0.0
    assert abs(s.alphas_cumprod[0] - NoiseSchedule.from_config(SD15).alphas_cumprod[0]) < 1e-7
    clamped = NoiseSchedule.from_config(dict(SD15, rescale_betas_zero_snr=True), clamp_terminal_alpha=True)
    assert clamped.alphas_cumprod[-1] == 2.0**-24
    assert abs(float(clamped.sigmas[-1]) - 4096.0) < 1e-2


def test_spacings_known_values():
    assert spaced_timesteps("leading", 1000, 20, 1).tolist() == list(range(951, 0, -50))
    assert spaced_timesteps("trailing", 1000, 20).tolist() == list(range(999, 0, -50))
    assert spaced_timesteps("linspace", 1000, 4).tolist() == [999, 666, 333, 0]
    lin = spaced_timesteps("linspace", 1000, 20, rounded=False)
    assert lin.dtype == np.float32 and lin[0] == 999 and lin[-1] == 0
    assert lin[1] == np.float32(999 * 18 / 19)  # fractional (946.42105...) for Euler-type schedulers
    assert spaced_timesteps("linspace", 1000, 1, rounded=False).tolist() == [0.0]  # diffusers: 1 step at t=0
    # DPM-Solver spaces steps + 1 points
    assert dpm_timesteps("leading", 1000, 20, 1).tolist() == [47 * k + 1 for k in range(20, 0, -1)]
    assert dpm_timesteps("linspace", 1000, 1).tolist() == [999]
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]
    # the np.arange float quirk (61 trailing steps give 62 timesteps, the last one -1)
    quirky = spaced_timesteps("trailing", 1000, 61)
    assert len(quirky) == 62 and quirky[-1] == -1
    with pytest.raises(InvalidArgument, match="timestep_spacing 'even'"):
        spaced_timesteps("even", 1000, 4)


def test_karras_and_sigma_to_t():
    s = NoiseSchedule.from_config(SD15)
    k = karras_sigmas(0.0292, 14.6146, 10)
    assert k[0] == pytest.approx(14.6146) and k[-1] == pytest.approx(0.0292) and np.all(np.diff(k) < 0)
    # rho = 7: sigma^(1/7) is linear in the ramp
    r = k ** (1 / 7)
    assert np.allclose(np.diff(r), np.diff(r)[0])
    # sigma_to_t inverts the interpolated table at integer timesteps
    ts = np.array([999.0, 500.0, 17.0, 0.0])
    back = s.sigma_to_t(s.sigma_at(ts))
    assert np.allclose(back, ts, atol=1e-3)
    assert float(sigma_to_t(1e-12, s.log_sigmas)) == 0.0  # clipped to the table


# --- tier 2: against diffusers --------------------------------------------------------
_CFG_VARIANTS = {
    "sd15": SD15,
    "linear": dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(SD15, beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(SD15, rescale_betas_zero_snr=True),
}


@pytest.mark.parametrize("variant", sorted(_CFG_VARIANTS))
def test_betas_and_alphas_cumprod_equal_diffusers(variant):
    d = _diffusers()
    cfg = _CFG_VARIANTS[variant]
    ref = d.DDIMScheduler.from_config(cfg)
    s = NoiseSchedule.from_config(cfg)
    if variant == "zero_snr":
        # rescale_zero_terminal_snr takes a float32 sqrt of a whole tensor, and torch's vectorised
        # float32 sqrt (MKL VML) is off by 1 ulp for ~19% of inputs; betas = 1 - a_i / a_{i-1}
        # then amplifies that (cancellation) to ~2.5e-4 relative in betas, ~4e-6 in alphas_cumprod
        assert np.allclose(s.betas, ref.betas.numpy(), rtol=1e-3, atol=0)
        assert np.allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-12)
    else:
        assert np.array_equal(s.betas.astype(np.float32), ref.betas.numpy())
        assert np.array_equal(s.alphas_cumprod.astype(np.float32), ref.alphas_cumprod.numpy())
    eul = d.EulerDiscreteScheduler.from_config(cfg)
    s2 = NoiseSchedule.from_config(cfg, clamp_terminal_alpha=True)
    assert np.allclose(s2.alphas_cumprod, eul.alphas_cumprod.numpy(), rtol=1e-5, atol=0)
    # the float32 sigma table: equal up to torch's float32 sqrt (1 ulp)
    table = (((1 - eul.alphas_cumprod) / eul.alphas_cumprod) ** 0.5).numpy()
    assert np.allclose(s2.sigmas, table, rtol=2.5e-7 if variant != "zero_snr" else 1e-5, atol=0)


def test_spaced_timesteps_equal_diffusers_set_timesteps():
    d = _diffusers()
    steps_list = list(range(1, 41)) + [50, 97, 150, 250, 333, 500, 999]
    for spacing in ("leading", "linspace", "trailing"):
        cfg = dict(SD15, timestep_spacing=spacing)
        ddim = d.DDIMScheduler.from_config(cfg)
        eul = d.EulerDiscreteScheduler.from_config(cfg)
        dpm = d.DPMSolverMultistepScheduler.from_config(cfg)
        for n in steps_list:
            ddim.set_timesteps(n)
            assert np.array_equal(spaced_timesteps(spacing, 1000, n, 1), ddim.timesteps.numpy()), (spacing, n)
            eul.set_timesteps(n)
            assert np.array_equal(
                spaced_timesteps(spacing, 1000, n, 1, rounded=False), eul.timesteps.numpy()
            ), (spacing, n)
            dpm.set_timesteps(n)
            assert np.array_equal(dpm_timesteps(spacing, 1000, n, 1), dpm.timesteps.numpy()), (spacing, n)
    lcm = d.LCMScheduler.from_config(SD15)
    for n in range(1, 51):
        lcm.set_timesteps(n)
        assert np.array_equal(lcm_timesteps(1000, n), lcm.timesteps.numpy()), n
