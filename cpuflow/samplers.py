"""Sampling loops: DDIM, PLMS, Euler, Euler ancestral, Heun, DPM-Solver++(2M), LCM.

Structure follows k-diffusion / stable-diffusion.cpp (a noise schedule, a
denoiser adapter, and one stateless loop per sampler) but every number is the
one diffusers' scheduler produces when built as
``XScheduler.from_config(model_scheduler_config, **overrides)`` and driven by
``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``.

Public API (called by the pipeline)::

    plan = make_plan(sampler, scheduler_config, steps, schedule="default", strength=1.0)
    x = initial_latents(plan, noise, init_latents=None)
    x = sample(plan, model_fn, x, generator=gen, eta=0.0, callback=None)

``sample`` keeps all multistep history in locals; a plan can be reused and
shared between threads.

Diffusers behaviours reproduced on purpose (see each loop for details):

* Scheduler classes have different defaults when the model config lacks a key:
  ``timestep_spacing`` is "leading" for DDIM/PNDM but "linspace" for Euler,
  Euler-a, Heun and DPM-Solver; DDIM clips x0 unless ``clip_sample: false``.
* Euler / Euler-a / Heun: ``init_noise_sigma`` is ``sigma_max`` for linspace /
  trailing spacing but ``sqrt(sigma_max^2 + 1)`` for leading, where sigma_max
  is the sigma of the first *scheduled* timestep (e.g. t=951 for 20 leading
  steps), not of t=999.
* DDIM: the previous timestep is always ``t - N // steps`` (even for linspace /
  trailing spacing where that is not the next scheduled timestep), and the
  last step goes to ``final_alpha_cumprod`` = ``alphas_cumprod[0]`` when
  ``set_alpha_to_one`` is false (SD configs), not to a clean x0.
* PLMS: ``steps + 1`` model calls (the second timestep is repeated: the first
  step is redone with the average of two eps, then 2-, 3-, 4-step
  Adams-Bashforth). In img2img the sliced timestep list no longer holds the
  repeat, so from the third call on the timesteps the UNet sees are one step
  off the noise level of the latents; reproduced as diffusers does it.
* DPM-Solver++ 2M: first step first-order; the final step is first-order
  (``final_sigmas_type="zero"``, or ``lower_order_final`` with < 15 steps) and
  with sigma_last = 0 it returns the x0 prediction exactly. Its linspace /
  leading timesteps space ``steps + 1`` points; its Karras sigmas span the full
  training range and its timesteps are rounded to integers, whereas Euler/Heun
  Karras sigmas span the sigmas of the spaced timesteps and keep fractional
  timesteps.
* Heun: 2 model calls per step except the last, which is a plain Euler step
  to sigma = 0.
* LCM: noise is drawn after every step except the last; c_skip / c_out are
  float32 (the pipeline passes the timestep as a tensor).
* img2img: ``init_timestep = min(int(steps * strength), steps)``,
  ``t_start = steps - init_timestep``, calls = ``timesteps[t_start * order:]``
  (order 2 for Heun), and the schedulers index their sigma tables from
  ``t_start * order`` (``set_begin_index``).

Where diffusers would silently compute something broken — an extra step at
timestep -1 from a float rounding in ``np.arange`` for ``trailing`` spacing
(e.g. 61 steps), a timestep outside 0..N-1 (DDIM indexes past its table), a
repeated timestep (DPM-Solver divides by a zero step) or NaN from DPM-Solver's
'heun' solver_type on a zero-length last step — ``make_plan`` raises
:class:`InvalidArgument` naming the nearest step counts that work. Where only
diffusers' timestep lookup crashes (DPM-Solver Karras schedules whose first
timestep repeats after rounding, e.g. cosine betas: IndexError in the txt2img
loop), cpuflow runs the schedule as diffusers' img2img path
(``set_begin_index``) does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np

from . import denoiser
from .config import MAX_STEPS, SCHEDULES
from .errors import BackendError, InvalidArgument
from .schedules import (
    NoiseSchedule,
    dpm_timesteps,
    karras_sigmas,
    lcm_timesteps,
    sigma_to_t,
    spaced_timesteps,
)

_f32 = np.float32
_ONE = np.float32(1.0)



# --- sampler registry ----------------------------------------------------------------
_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}

# ``inspect.signature(XScheduler.__init__)`` defaults of diffusers 0.42 (tests check them).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        **_COMMON,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {
        **_COMMON,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
    "EulerDiscreteScheduler": {
        **_COMMON,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        **_COMMON,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        **_COMMON,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    },
    "DPMSolverMultistepScheduler": {
        **_COMMON,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "LCMScheduler": {
        **_COMMON,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    },
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    description: str
    diffusers_class: str
    stochastic: bool  # draws noise from the generator while sampling (ddim: only when eta > 0)
    ancestral: bool
    model_calls_per_step: int  # heun: 2 (the last step 1); plms: 1 plus one warm-up repeat
    order: int  # diffusers' ``scheduler.order`` (img2img slices timesteps[t_start * order:])
    supports_karras: bool
    prediction_types: tuple[str, ...]
    accepts_eta: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    beta_schedules: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")

    @property
    def defaults(self) -> Mapping[str, Any]:
        return MappingProxyType(_DEFAULTS[self.diffusers_class])


_EPS_V_X0 = ("epsilon", "v_prediction", "sample")

SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType(
    {
        "ddim": SamplerSpec(
            "ddim",
            "DDIM (Song et al. 2021); deterministic at eta=0, eta=1 is DDPM-like ancestral sampling",
            "DDIMScheduler", stochastic=False, ancestral=False, model_calls_per_step=1, order=1,
            supports_karras=False, prediction_types=_EPS_V_X0, accepts_eta=True,
        ),
        "plms": SamplerSpec(
            "plms",
            "PLMS / PNDM (Liu et al. 2022), linear multistep; diffusers' SD default",
            "PNDMScheduler", stochastic=False, ancestral=False, model_calls_per_step=1, order=1,
            supports_karras=False, prediction_types=("epsilon", "v_prediction"),
            overrides=MappingProxyType({"skip_prk_steps": True}),
        ),
        "euler": SamplerSpec(
            "euler",
            "Euler method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn)",
            "EulerDiscreteScheduler", stochastic=False, ancestral=False, model_calls_per_step=1, order=1,
            supports_karras=True, prediction_types=_EPS_V_X0,
        ),
        "euler_a": SamplerSpec(
            "euler_a",
            "Euler ancestral: Euler step to sigma_down plus fresh noise sigma_up each step",
            "EulerAncestralDiscreteScheduler", stochastic=True, ancestral=True, model_calls_per_step=1,
            order=1, supports_karras=False, prediction_types=("epsilon", "v_prediction"),
        ),
        "heun": SamplerSpec(
            "heun",
            "Heun's 2nd-order method (Karras et al. 2022, alg. 1); 2 model calls per step",
            "HeunDiscreteScheduler", stochastic=False, ancestral=False, model_calls_per_step=2, order=2,
            supports_karras=True, prediction_types=_EPS_V_X0,
            beta_schedules=("linear", "scaled_linear", "squaredcos_cap_v2", "exp"),
        ),
        "dpmpp_2m": SamplerSpec(
            "dpmpp_2m",
            "DPM-Solver++(2M) (Lu et al. 2022), 2nd-order multistep in log-SNR",
            "DPMSolverMultistepScheduler", stochastic=False, ancestral=False, model_calls_per_step=1,
            order=1, supports_karras=True, prediction_types=_EPS_V_X0,
            overrides=MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ),
        "lcm": SamplerSpec(
            "lcm",
            "Latent Consistency Model sampling (Luo et al. 2023), for LCM / LCM-LoRA weights, 2-8 steps",
            "LCMScheduler", stochastic=True, ancestral=False, model_calls_per_step=1, order=1,
            supports_karras=False, prediction_types=_EPS_V_X0,
        ),
    }
)

KARRAS_SAMPLERS = tuple(n for n, s in SAMPLERS.items() if s.supports_karras)


# --- the plan --------------------------------------------------------------------------
def _ro(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything ``sample`` needs; immutable (arrays are read-only).

    timesteps: float64, the model timestep of each UNet call in order
        (values are exactly representable in float32; integers for ddim, plms,
        dpmpp_2m, lcm).
    n_model_calls: ``len(timesteps)``.
    steps: requested inference steps; denoise_steps: steps actually run
        (``steps - t_start`` for img2img).
    begin_index: ``t_start * order``, index into ``schedule_timesteps`` of the first call.
    schedule_timesteps: diffusers' ``scheduler.timesteps`` before img2img slicing.
    sigmas: float32 ``scheduler.sigmas`` (euler, euler_a, heun, dpmpp_2m), else None.
    alphas_cumprod: float64 array of diffusers' float32 ``alphas_cumprod``.
    init_noise_sigma: ``scheduler.init_noise_sigma`` (txt2img noise scale).
    config: the scheduler config diffusers would hold (class defaults <- model
        config <- overrides), read-only.
    """

    sampler: str
    steps: int
    schedule: str
    strength: float
    prediction_type: str
    timesteps: np.ndarray
    n_model_calls: int
    denoise_steps: int
    begin_index: int
    schedule_timesteps: np.ndarray
    sigmas: Optional[np.ndarray]
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    init_noise_sigma: float
    diffusers_class: str
    config: Mapping[str, Any]

    @property
    def spec(self) -> SamplerSpec:
        return SAMPLERS[self.sampler]

    @property
    def karras(self) -> bool:
        """Whether the sigmas are Karras-spaced (the model's config or ``--schedule karras``)."""
        return bool(self.config.get("use_karras_sigmas"))


def resolve_config(spec: SamplerSpec, scheduler_config: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """``XScheduler.from_config(scheduler_config, **overrides).config``.

    The class ``__init__`` defaults, updated with the config keys the class
    accepts (keys listed in ``_use_default_values`` keep their default), then
    the overrides. As in diffusers, the config's other (public) keys are kept
    too: ``from_config`` registers them on the scheduler's config after
    ``__init__``, and Heun / DPM-Solver read ``sigma_min`` / ``sigma_max``
    from there for Karras sigmas even though their ``__init__`` has no such
    parameter.
    """
    if not isinstance(scheduler_config, Mapping):
        raise InvalidArgument(
            "scheduler_config must be a mapping (the scheduler_config.json content), "
            f"got {type(scheduler_config).__name__}"
        )
    cfg = dict(_DEFAULTS[spec.diffusers_class])
    used_defaults = set(scheduler_config.get("_use_default_values", None) or ())
    hidden = {}
    for k, v in scheduler_config.items():
        if k in used_defaults or k.startswith("_"):
            continue
        if k in cfg:
            cfg[k] = v
        else:
            hidden[k] = v
    cfg.update(spec.overrides)
    cfg.update(extra)
    hidden.update(cfg)
    return hidden


def _strength_min(steps: int) -> float:
    s = math.ceil(100.0 / steps) / 100.0
    while int(steps * s) < 1:
        s = round(s + 0.01, 2)
    return s


def _validate(sampler: Any, steps: Any, schedule: Any, strength: Any) -> tuple[SamplerSpec, int, float]:
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise InvalidArgument(f"sampler {sampler!r} is not known; valid samplers: {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise InvalidArgument(f"steps={steps!r} is not an integer; steps must be an integer from 1 to {MAX_STEPS}")
    steps = int(steps)
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument(f"steps={steps} is out of range; steps must be from 1 to {MAX_STEPS}")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise InvalidArgument(f"schedule {schedule!r} is not known; valid schedules: {', '.join(SCHEDULES)}")
    if schedule == "karras" and not spec.supports_karras:
        raise InvalidArgument(
            f"schedule 'karras' is not supported by sampler {sampler!r}; "
            f"samplers that support karras: {', '.join(KARRAS_SAMPLERS)}"
        )
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise InvalidArgument(f"strength={strength!r} is not a number; strength must be between 0 and 1")
    strength = float(strength)
    if not (0.0 <= strength <= 1.0):  # also rejects NaN
        raise InvalidArgument(f"strength={strength} is out of range; strength must be between 0 and 1")
    if min(int(steps * strength), steps) < 1:
        raise InvalidArgument(
            f"strength {strength:g} with {steps} steps leaves no denoising step; "
            f"use strength >= {_strength_min(steps):g}"
        )
    return spec, steps, strength


_UNSUPPORTED_FLAGS = (
    "thresholding",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
)


def _check_config(spec: SamplerSpec, full_cfg: Mapping[str, Any]) -> None:
    """Refuse options of the scheduler class that cpuflow does not implement
    (only the class's own keys count: diffusers ignores the others)."""
    name = spec.name
    defaults = _DEFAULTS[spec.diffusers_class]
    cfg = {k: full_cfg[k] for k in defaults}
    for key, default in defaults.items():
        v = cfg[key]
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(v, (bool, np.bool_))
            kind = "true or false"
        elif isinstance(default, int):
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            kind = "an integer"
        elif isinstance(default, float):
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            ok = ok and (math.isfinite(float(v)) or key == "lambda_min_clipped")
            kind = "a number"
        else:
            ok = isinstance(v, str)
            kind = "a string"
        if not ok:
            raise InvalidArgument(f"scheduler config {key}={v!r} is invalid; it must be {kind}")
    if cfg["num_train_timesteps"] < 2:
        raise InvalidArgument(
            f"scheduler config num_train_timesteps={cfg['num_train_timesteps']!r} is invalid; it must be >= 2"
        )
    for key in _UNSUPPORTED_FLAGS:
        if key in cfg and cfg[key]:
            raise InvalidArgument(
                f"scheduler config {key}={cfg[key]!r} is not supported by cpuflow's {name!r} sampler; it must be false"
            )
    checks = {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "variance_type": None,
    }
    for key, want in checks.items():
        if key in cfg and cfg[key] != want:
            raise InvalidArgument(
                f"scheduler config {key}={cfg[key]!r} is not supported by cpuflow's {name!r} sampler; it must be {want!r}"
            )
    if "solver_type" in cfg and cfg["solver_type"] not in ("midpoint", "heun"):
        raise InvalidArgument(f"scheduler config solver_type={cfg['solver_type']!r} is not known; valid: midpoint, heun")
    if "final_sigmas_type" in cfg and cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise InvalidArgument(
            f"scheduler config final_sigmas_type={cfg['final_sigmas_type']!r} is not known; valid: zero, sigma_min"
        )
    pred = cfg["prediction_type"]
    if pred not in spec.prediction_types:
        raise InvalidArgument(
            f"scheduler config prediction_type={pred!r} is not supported by sampler {name!r} "
            f"(diffusers' {spec.diffusers_class}); it supports: {', '.join(spec.prediction_types)}"
        )
    bs = cfg.get("beta_schedule")
    if cfg.get("trained_betas") is None and bs not in spec.beta_schedules:
        raise InvalidArgument(
            f"scheduler config beta_schedule={bs!r} is not supported by sampler {name!r}; "
            f"valid: {', '.join(spec.beta_schedules)}"
        )
    spacing = cfg.get("timestep_spacing")
    if spacing not in ("leading", "linspace", "trailing"):
        raise InvalidArgument(
            f"scheduler config timestep_spacing={spacing!r} is not known; valid: leading, linspace, trailing"
        )
    for key in ("steps_offset",):
        v = cfg.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InvalidArgument(f"scheduler config {key}={v!r} is invalid; it must be an integer >= 0")


def _grid_problem(ts: np.ndarray, steps: int, n_train: int) -> str | None:
    if len(ts) != steps:
        return (
            f"gives {len(ts)} timesteps instead of {steps} (a float rounding quirk of diffusers' "
            f"np.arange spacing adds a step at timestep {float(ts[-1]):g})"
        )
    lo, hi = float(np.min(ts)), float(np.max(ts))
    if lo < 0 or hi > n_train - 1:
        bad = hi if hi > n_train - 1 else lo
        return f"gives timestep {bad:g}, outside the trained range 0..{n_train - 1}"
    if len(ts) > 1 and not np.all(np.diff(ts) < 0):
        return "gives repeated timesteps (a zero-length step)"
    return None


def _checked_grid(
    grid: Callable[[int], np.ndarray], steps: int, n_train: int, cfg: Mapping[str, Any]
) -> np.ndarray:
    """``grid(steps)``, refusing spacings on which diffusers misbehaves: a wrong number
    of timesteps, a timestep outside 0..N-1 (DDIM would index past its table), or a
    repeated timestep (DPM-Solver divides by a zero step). The message names the
    nearest step counts that work."""
    ts = grid(steps)
    problem = _grid_problem(ts, steps, n_train)
    if problem is None:
        return ts
    limit = min(MAX_STEPS, n_train)
    ok = []
    for cand in (range(steps - 1, 0, -1), range(steps + 1, limit + 1)):
        for s in cand:
            if _grid_problem(grid(s), s, n_train) is None:
                ok.append(str(s))
                break
    hint = f"; use {' or '.join(ok)} steps" if ok else ""
    raise InvalidArgument(
        f"steps={steps} with timestep_spacing {cfg.get('timestep_spacing')!r} and steps_offset "
        f"{cfg.get('steps_offset', 0)} {problem}{hint}"
    )


def _karras_range(cfg: Mapping[str, Any], default_min: float, default_max: float) -> tuple[float, float]:
    out = []
    for key, default in (("sigma_min", default_min), ("sigma_max", default_max)):
        v = cfg.get(key)
        if v is None:
            out.append(float(default))
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise InvalidArgument(f"scheduler config {key}={v!r} is not a number") from None
        if not (v > 0 and math.isfinite(v)):
            raise InvalidArgument(f"scheduler config {key}={v!r} is invalid; it must be a positive number")
        out.append(v)
    return out[0], out[1]


def make_plan(
    sampler: str,
    scheduler_config: Mapping[str, Any],
    steps: int,
    *,
    schedule: str = "default",
    strength: float = 1.0,
) -> SamplingPlan:
    """Plan a run: timesteps, sigma / alpha tables and the img2img start.

    Each sampler reads the model's scheduler config as
    ``XScheduler.from_config(config, **overrides)`` does: ``schedule='default'``
    keeps the config's own ``use_karras_sigmas`` (many community models set it,
    and diffusers honours it), ``'karras'`` overrides it to true, ``'uniform'``
    to false. Raises
    :class:`InvalidArgument` for an unknown sampler or schedule, steps outside
    1..1000, strength outside [0, 1] or too small to leave a step, and config
    options cpuflow does not implement.
    """
    spec, steps, strength = _validate(sampler, steps, schedule, strength)
    extra: dict[str, Any] = {}
    if "use_karras_sigmas" in _DEFAULTS[spec.diffusers_class] and schedule != "default":
        extra["use_karras_sigmas"] = schedule == "karras"
    full_cfg = resolve_config(spec, scheduler_config, extra)
    _check_config(spec, full_cfg)
    # The loops read only the class's own keys, plus sigma_min / sigma_max which
    # diffusers' _convert_to_karras looks up with hasattr() on the full config.
    cfg = {k: full_cfg[k] for k in _DEFAULTS[spec.diffusers_class]}
    for key in ("sigma_min", "sigma_max"):
        cfg.setdefault(key, full_cfg.get(key))
    n_train = int(cfg["num_train_timesteps"])
    if steps > n_train:
        raise InvalidArgument(
            f"steps={steps} is more than num_train_timesteps={n_train}; use at most {n_train} steps"
        )
    builder = _BUILDERS[spec.name]
    full_ts, sigmas, sched, final_alpha, init_sigma = builder(spec, cfg, steps)

    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    begin = t_start * spec.order
    calls = np.asarray(full_ts, dtype=np.float64)[begin:]
    if calls.size == 0:  # cannot happen after _validate; kept as a guard
        raise InvalidArgument(f"strength {strength:g} with {steps} steps leaves no denoising step")
    cfg_ro = MappingProxyType(dict(full_cfg))
    return SamplingPlan(
        sampler=spec.name,
        steps=steps,
        schedule=schedule,
        strength=strength,
        prediction_type=str(cfg["prediction_type"]),
        timesteps=_ro(calls),
        n_model_calls=int(calls.size),
        denoise_steps=steps - t_start,
        begin_index=begin,
        schedule_timesteps=_ro(np.asarray(full_ts, dtype=np.float64)),
        sigmas=None if sigmas is None else _ro(np.asarray(sigmas, dtype=np.float32)),
        alphas_cumprod=sched.alphas_cumprod,
        final_alpha_cumprod=float(final_alpha),
        init_noise_sigma=float(init_sigma),
        diffusers_class=spec.diffusers_class,
        config=cfg_ro,
    )


# --- per-sampler schedules (what set_timesteps computes) -------------------------------
def _build_ddim(spec, cfg, steps):
    sched = NoiseSchedule.from_config(cfg)
    n = int(cfg["num_train_timesteps"])
    ts = _checked_grid(
        lambda s: spaced_timesteps(cfg["timestep_spacing"], n, s, int(cfg["steps_offset"])), steps, n, cfg
    )
    return ts, None, sched, sched.final_alpha_cumprod(bool(cfg["set_alpha_to_one"])), 1.0


def _build_plms(spec, cfg, steps):
    sched = NoiseSchedule.from_config(cfg)
    n = int(cfg["num_train_timesteps"])
    base = _checked_grid(
        lambda s: spaced_timesteps(cfg["timestep_spacing"], n, s, int(cfg["steps_offset"])), steps, n, cfg
    )
    asc = base[::-1]
    # skip_prk_steps: the second-to-last ascending timestep is repeated (PNDMScheduler.set_timesteps)
    plms = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].copy().astype(np.int64)
    return plms, None, sched, sched.final_alpha_cumprod(bool(cfg["set_alpha_to_one"])), 1.0


def _k_init_noise_sigma(sigmas: np.ndarray, spacing: str) -> np.float32:
    smax = _f32(np.max(sigmas))
    if spacing in ("linspace", "trailing"):
        return smax
    return _f32(np.sqrt(_f32(smax * smax + _ONE)))


def _build_euler_like(spec, cfg, steps):
    """Euler / Euler-a / Heun ``set_timesteps`` (float32 timesteps, interpolated sigmas)."""
    clamp = spec.diffusers_class in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
    sched = NoiseSchedule.from_config(cfg, clamp_terminal_alpha=clamp)
    n = int(cfg["num_train_timesteps"])
    spacing = cfg["timestep_spacing"]
    ts = _checked_grid(
        lambda s: spaced_timesteps(spacing, n, s, int(cfg["steps_offset"]), rounded=False), steps, n, cfg
    )
    sig = sched.sigma_at(ts)  # float64, np.interp on the float32 table
    if cfg.get("use_karras_sigmas"):
        # range: the sigmas of the first / last spaced timestep unless the config sets them
        smin, smax = _karras_range(cfg, sig[-1], sig[0])
        sig = karras_sigmas(smin, smax, steps)
        log_sigmas = sched.log_sigmas
        ts = np.array([sigma_to_t(s, log_sigmas) for s in sig])
        if steps > 1 and not np.all(np.diff(sig) < 0):
            raise InvalidArgument(f"schedule 'karras' with steps={steps} gives repeated sigmas; use fewer steps")
    if cfg.get("final_sigmas_type", "zero") == "sigma_min":
        a0 = _f32(sched.alphas_cumprod[0])
        sigma_last = float(_f32(np.sqrt(_f32(_f32(_ONE - a0) / a0))))
    else:
        sigma_last = 0.0
    sigmas = np.concatenate([sig, [sigma_last]]).astype(np.float32)
    ts = np.asarray(ts).astype(np.float32)
    init_sigma = _k_init_noise_sigma(sigmas, spacing)
    if spec.name == "heun":
        # [s0, s1, s1, s2, s2, ..., s_{n-1}, s_{n-1}, 0] and [t0, t1, t1, ..., t_{n-1}, t_{n-1}]
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    return ts, sigmas, sched, 1.0, init_sigma


def _build_dpm(spec, cfg, steps):
    sched = NoiseSchedule.from_config(cfg, clamp_terminal_alpha=True)
    n = int(cfg["num_train_timesteps"])
    last = n
    lmc = float(cfg.get("lambda_min_clipped", -float("inf")))
    if lmc != -float("inf"):
        a = sched.alphas_cumprod_f32
        with np.errstate(divide="ignore"):
            lam = np.log(np.sqrt(a)) - np.log(np.sqrt(_ONE - a))
        clipped_idx = int(np.searchsorted(lam[::-1], lmc, side="left"))
        last = n - clipped_idx
    grid = lambda s: dpm_timesteps(cfg["timestep_spacing"], n, s, int(cfg["steps_offset"]), last)  # noqa: E731
    if cfg.get("use_karras_sigmas"):
        # range: the whole training sigma table (unlike Euler / Heun) unless the config sets it
        table = sched.sigmas
        smin, smax = _karras_range(cfg, table[0], table[-1])
        sig = karras_sigmas(smin, smax, steps)
        ts = sched.sigma_to_t(sig)
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
        # Rounding may repeat a timestep (the sigmas stay distinct): diffusers keeps it. If the
        # *first* timestep repeats, diffusers' txt2img loop fails (index_for_timestep picks
        # the second copy and runs off the table); cpuflow runs it as diffusers' img2img
        # path (set_begin_index) does.
        if steps > 1 and not np.all(np.diff(sig) < 0):
            raise InvalidArgument(f"schedule 'karras' with steps={steps} gives repeated sigmas; use fewer steps")
    else:
        ts = _checked_grid(grid, steps, n, cfg)
        sig = sched.sigma_at(ts)
    if cfg.get("final_sigmas_type", "zero") == "sigma_min":
        a0 = _f32(sched.alphas_cumprod[0])
        sigma_last = float(_f32(np.sqrt(_f32(_f32(_ONE - a0) / a0))))
    else:
        sigma_last = 0.0
    sigmas = np.concatenate([sig, [sigma_last]]).astype(np.float32)
    final_first_order = bool(cfg["euler_at_final"]) or (bool(cfg["lower_order_final"]) and steps < 15) or (
        cfg["final_sigmas_type"] == "zero"
    )
    if cfg["solver_type"] == "heun" and steps > 1 and sigmas[-1] >= sigmas[-2] and not final_first_order:
        # diffusers computes (e^{-h} - 1) / h with h = 0 here and returns NaN latents
        raise InvalidArgument(
            f"final_sigmas_type 'sigma_min' with schedule {'karras' if cfg.get('use_karras_sigmas') else 'default'!r} "
            f"and {steps} steps makes the last DPM-Solver step zero-length, which solver_type 'heun' "
            "cannot take (diffusers returns NaN); use fewer than 15 steps or solver_type 'midpoint'"
        )
    return ts.astype(np.int64), sigmas, sched, 1.0, 1.0


def _build_lcm(spec, cfg, steps):
    sched = NoiseSchedule.from_config(cfg)
    n = int(cfg["num_train_timesteps"])
    orig = cfg.get("original_inference_steps", 50)
    if isinstance(orig, bool) or not isinstance(orig, (int, np.integer)) or not 1 <= orig <= n:
        raise InvalidArgument(
            f"scheduler config original_inference_steps={orig!r} is invalid; it must be an integer from 1 to {n}"
        )
    if steps > orig:
        raise InvalidArgument(
            f"steps={steps} is too many for sampler 'lcm'; it allows at most "
            f"original_inference_steps={orig} steps (LCM models are meant for 2-8 steps)"
        )
    ts = lcm_timesteps(n, steps, int(orig))
    return ts, None, sched, sched.final_alpha_cumprod(bool(cfg["set_alpha_to_one"])), 1.0


_BUILDERS = {
    "ddim": _build_ddim,
    "plms": _build_plms,
    "euler": _build_euler_like,
    "euler_a": _build_euler_like,
    "heun": _build_euler_like,
    "dpmpp_2m": _build_dpm,
    "lcm": _build_lcm,
}


# --- initial latents -------------------------------------------------------------------
def initial_latents(plan: SamplingPlan, noise: np.ndarray, init_latents: np.ndarray | None = None) -> np.ndarray:
    """The latents the sampling loop starts from.

    txt2img (``init_latents is None``): ``noise * init_noise_sigma``.
    img2img: the scheduler's ``add_noise(init_latents, noise, timesteps[0])``:
    VP ``sqrt(a_t) x0 + sqrt(1 - a_t) n`` (ddim, plms, lcm), VE ``x0 + sigma n``
    (euler, euler_a, heun) or DPM-Solver's ``alpha_t x0 + sigma_t n``.
    """
    noise = np.asarray(noise, dtype=np.float32)
    if init_latents is None:
        if plan.strength < 1.0:
            raise InvalidArgument(
                f"strength={plan.strength:g} needs init_latents (img2img); txt2img uses strength 1.0"
            )
        return noise * _f32(plan.init_noise_sigma)
    x0 = np.asarray(init_latents, dtype=np.float32)
    if x0.shape != noise.shape:
        raise InvalidArgument(
            f"init_latents shape {x0.shape} does not match noise shape {noise.shape}; they must be equal"
        )
    return noised_latents(plan, x0, noise, 0)


def noised_latents(plan: SamplingPlan, x0: np.ndarray, noise: np.ndarray, call: int) -> np.ndarray:
    """The scheduler's ``add_noise(x0, noise, t)`` at the noise level of model call ``call``
    (0: the first; img2img starts there), in the frame the sampler's latents live in.

    The inpainting loop for 4-channel UNets (diffusers' StableDiffusionInpaintPipeline)
    noises the known region to ``timesteps[i + 1]`` after step i; the schedulers then
    read their own step index: ``sigmas[begin_index + i + 1]`` (Euler-like, DPM-Solver)
    or ``alphas_cumprod[timesteps[i + 1]]`` (DDIM, PLMS, LCM)."""
    name = plan.sampler
    if name in ("ddim", "plms", "lcm"):
        a = _f32(plan.alphas_cumprod[int(plan.timesteps[call])])
        return _f32(np.sqrt(a)) * x0 + _f32(np.sqrt(_f32(_ONE - a))) * noise
    sigma = plan.sigmas[plan.begin_index + call]
    if name == "dpmpp_2m":
        alpha_t, sigma_t = denoiser.vp_alpha_sigma(sigma)
        return alpha_t * x0 + sigma_t * noise
    return x0 + noise * _f32(sigma)


# --- the loop ----------------------------------------------------------------------------
class NoiseGenerator(Protocol):
    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


ModelFn = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[int, int, np.ndarray, Optional[np.ndarray]], None]
PostStep = Callable[[int, np.ndarray], np.ndarray]


def sample(
    plan: SamplingPlan,
    model_fn: ModelFn,
    x: np.ndarray,
    *,
    generator: NoiseGenerator | None,
    eta: float = 0.0,
    callback: Callback | None = None,
    post_step: PostStep | None = None,
) -> np.ndarray:
    """Run the sampler; returns the final latents (before VAE scaling).

    ``model_fn(x_in, t)`` gets the scaled float32 latents and the float
    timestep (``plan.timesteps[i]``) and returns the raw model output (after
    CFG), same shape. It must not modify ``x_in``. Noise is drawn as
    ``generator.randn(x.shape)`` at the points and in the order diffusers'
    ``scheduler.step`` draws it. ``callback(i, n, x, x0_pred)`` runs after
    every model call (``n = plan.n_model_calls``); an exception it raises
    propagates (cancellation). ``post_step(i, x) -> x`` replaces the latents
    after model call i, before the next call and the callback (inpainting
    with a 4-channel UNet blends the known region back there, as diffusers does
    after each ``scheduler.step``).
    """
    if not isinstance(plan, SamplingPlan):
        raise InvalidArgument(f"plan must be a SamplingPlan from make_plan, got {type(plan).__name__}")
    spec = plan.spec
    try:
        eta_f = float(eta)
    except (TypeError, ValueError):
        raise InvalidArgument(f"eta={eta!r} is not a number; eta must be between 0 and 1") from None
    if not (0.0 <= eta_f <= 1.0):
        raise InvalidArgument(f"eta={eta!r} is out of range; eta must be between 0 and 1")
    if eta_f != 0.0 and not spec.accepts_eta:
        raise InvalidArgument(f"eta={eta!r} applies only to sampler 'ddim'; use eta=0 with {plan.sampler!r}")
    needs_noise = spec.stochastic or (spec.accepts_eta and eta_f > 0.0)
    if needs_noise and generator is None:
        raise InvalidArgument(f"sampler {plan.sampler!r} draws noise while sampling; pass a generator")
    x = np.asarray(x, dtype=np.float32)
    run = _LOOPS[plan.sampler]
    return run(plan, _Model(model_fn, x.shape, plan.n_model_calls, callback, post_step), x, generator, eta_f)


class _Model:
    """Calls model_fn, checks its output, and reports progress."""

    __slots__ = ("fn", "shape", "n", "callback", "post_step", "i")

    def __init__(self, fn: ModelFn, shape: tuple[int, ...], n: int, callback: Callback | None,
                 post_step: PostStep | None = None):
        self.fn, self.shape, self.n, self.callback, self.post_step, self.i = fn, shape, n, callback, post_step, 0

    def __call__(self, x_in: np.ndarray, t: float) -> np.ndarray:
        out = np.asarray(self.fn(x_in, float(t)), dtype=np.float32)
        if out.shape != self.shape:
            raise BackendError(
                f"the model returned shape {out.shape} for latents of shape {self.shape}; they must be equal"
            )
        return out

    def done(self, x: np.ndarray, x0: np.ndarray | None) -> np.ndarray:
        """After model call i: the post-step hook (may replace x), then the callback; returns x."""
        i = self.i
        self.i += 1
        if self.post_step is not None:
            x = np.asarray(self.post_step(i, x), dtype=np.float32)
        if self.callback is not None:
            self.callback(i, self.n, x, x0)
        return x


def _randn(generator: NoiseGenerator, shape: tuple[int, ...]) -> np.ndarray:
    noise = np.asarray(generator.randn(tuple(shape)), dtype=np.float32)
    if noise.shape != tuple(shape):
        raise BackendError(f"the generator returned shape {noise.shape}; expected {tuple(shape)}")
    return noise


def _ac(plan: SamplingPlan, t: int) -> np.float32:
    return _f32(plan.alphas_cumprod[t])


def _run_ddim(plan, model, x, generator, eta):
    """DDIM, Song et al. 2021, eq. (12):
    x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1} - s_t^2) eps + s_t z,
    s_t = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1})   (eq. (16)).
    """
    cfg = plan.config
    pred = plan.prediction_type
    delta = int(cfg["num_train_timesteps"]) // plan.steps
    clip = bool(cfg["clip_sample"])
    r = _f32(cfg["clip_sample_range"])
    eta32 = _f32(eta)
    for t in plan.timesteps:
        t = int(t)
        mo = model(x, t)
        prev_t = t - delta  # diffusers: always t - N // steps
        a_t = _ac(plan, t)
        a_prev = _ac(plan, prev_t) if prev_t >= 0 else _f32(plan.final_alpha_cumprod)
        b_t = _f32(_ONE - a_t)
        x0, eps = denoiser.vp_x0_eps(mo, x, a_t, pred)
        if clip:
            x0 = np.clip(x0, -r, r)
        b_prev = _f32(_ONE - a_prev)
        variance = _f32(_f32(b_prev / b_t) * _f32(_ONE - _f32(a_t / a_prev)))
        std = _f32(eta32 * _f32(np.sqrt(variance)))
        direction = _f32(np.sqrt(_f32(_f32(_ONE - a_prev) - _f32(std * std)))) * eps
        x = _f32(np.sqrt(a_prev)) * x0 + direction
        if eta > 0:
            x = x + std * _randn(generator, x.shape)
        x = model.done(x, x0)
    return x


def _run_plms(plan, model, x, generator, eta):
    """PLMS with skip_prk_steps (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models", eq. (12) linear multistep on eps, with the transfer phi of eq. (11)):

    call 0: Euler-like step with eps_0; call 1: redo the first step with (eps_0 + eps_1) / 2;
    then 2-, 3- and 4-step Adams-Bashforth: (3e1 - e2)/2, (23e1 - 16e2 + 5e3)/12,
    (55e1 - 59e2 + 37e3 - 9e4)/24.

    A literal replay of PNDMScheduler.step_plms' counter logic over the (possibly
    img2img-sliced) timesteps, with the state in locals.
    """
    pred = plan.prediction_type
    delta = int(plan.config["num_train_timesteps"]) // plan.steps
    final_alpha = _f32(plan.final_alpha_cumprod)
    ets: list[np.ndarray] = []
    cur_sample = None
    for counter, t in enumerate(plan.timesteps):
        t = int(t)
        mo = model(x, t)
        timestep = t
        prev_t = timestep - delta
        if counter != 1:
            ets = ets[-3:]
            ets.append(mo)
        else:
            prev_t = timestep
            timestep = timestep + delta
        sample_in = x
        if len(ets) == 1 and counter == 0:
            e = mo
            cur_sample = x
        elif len(ets) == 1 and counter == 1:
            e = (mo + ets[-1]) / _f32(2)
            sample_in = cur_sample
            cur_sample = None
        elif len(ets) == 2:
            e = (_f32(3) * ets[-1] - ets[-2]) / _f32(2)
        elif len(ets) == 3:
            e = (_f32(23) * ets[-1] - _f32(16) * ets[-2] + _f32(5) * ets[-3]) / _f32(12)
        else:
            e = _f32(1 / 24) * (_f32(55) * ets[-1] - _f32(59) * ets[-2] + _f32(37) * ets[-3] - _f32(9) * ets[-4])
        x = _pndm_prev_sample(plan, sample_in, timestep, prev_t, e, pred, final_alpha)
        x = model.done(x, None)
    return x


def _pndm_prev_sample(plan, sample, t, prev_t, model_output, pred, final_alpha):
    """PNDM's transfer phi(x_t, eps, t, t-delta), Liu et al. 2022, eq. (11):
    x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps /
             (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))."""
    a_t = _ac(plan, t)
    a_prev = _ac(plan, prev_t) if prev_t >= 0 else final_alpha
    b_t = _f32(_ONE - a_t)
    b_prev = _f32(_ONE - a_prev)
    eps = denoiser.vp_eps(model_output, sample, a_t, pred)
    sample_coeff = _f32(np.sqrt(_f32(a_prev / a_t)))
    denom = _f32(_f32(a_t * _f32(np.sqrt(b_prev))) + _f32(np.sqrt(_f32(_f32(a_t * b_t) * a_prev))))
    return sample_coeff * sample - (_f32(a_prev - a_t) * eps) / denom


def _run_euler(plan, model, x, generator, eta):
    """Euler on dx/dsigma = (x - x0) / sigma (Karras et al. 2022, alg. 2 with S_churn = 0)."""
    pred = plan.prediction_type
    sig = plan.sigmas
    for j, t in enumerate(plan.timesteps):
        k = plan.begin_index + j
        sigma = sig[k]
        mo = model(denoiser.scale_model_input(x, sigma), t)
        x0 = denoiser.ve_x0(mo, x, sigma, pred)
        d = denoiser.ve_derivative(x, x0, sigma)
        dt = _f32(sig[k + 1] - sigma)
        x = x + d * dt
        x = model.done(x, x0)
    return x


def _run_euler_a(plan, model, x, generator, eta):
    """Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1):
    sigma_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2), sigma_down = sqrt(s_to^2 - sigma_up^2);
    Euler step to sigma_down, then add sigma_up * z (noise drawn every step, also the last)."""
    pred = plan.prediction_type
    sig = plan.sigmas
    for j, t in enumerate(plan.timesteps):
        k = plan.begin_index + j
        sigma = sig[k]
        mo = model(denoiser.scale_model_input(x, sigma), t)
        x0 = denoiser.ve_x0(mo, x, sigma, pred)
        s_from, s_to = sigma, sig[k + 1]
        s_to2 = _f32(s_to * s_to)
        s_from2 = _f32(s_from * s_from)
        sigma_up = _f32(np.sqrt(_f32(_f32(s_to2 * _f32(s_from2 - s_to2)) / s_from2)))
        sigma_down = _f32(np.sqrt(_f32(s_to2 - _f32(sigma_up * sigma_up))))
        d = denoiser.ve_derivative(x, x0, sigma)
        x = x + d * _f32(sigma_down - sigma)
        x = x + _randn(generator, x.shape) * sigma_up
        x = model.done(x, x0)
    return x


def _run_heun(plan, model, x, generator, eta):
    """Heun's method (Karras et al. 2022, alg. 1 / alg. 2 with S_churn = 0):
    d = (x - x0(x, s_i)) / s_i;  x' = x + (s_{i+1} - s_i) d;
    d' = (x' - x0(x', s_{i+1})) / s_{i+1};  x_{i+1} = x + (s_{i+1} - s_i) (d + d') / 2;
    the last step (s_{i+1} = 0) is a plain Euler step. The sigma table is diffusers'
    interleaved [s0, s1, s1, s2, s2, ..., 0]; even calls are first-order."""
    pred = plan.prediction_type
    cfg = plan.config
    clip = bool(cfg["clip_sample"])
    r = _f32(cfg["clip_sample_range"])
    sig = plan.sigmas
    prev_d = dt = x_prev = None
    for j, t in enumerate(plan.timesteps):
        k = plan.begin_index + j
        mo = model(denoiser.scale_model_input(x, sig[k]), t)
        first = dt is None
        if first:
            sigma, sigma_next = sig[k], sig[k + 1]
            sigma_in = sigma
        else:
            sigma, sigma_next = sig[k - 1], sig[k]
            sigma_in = sigma_next
        x0 = denoiser.ve_x0(mo, x, sigma_in, pred)
        if clip:
            x0 = np.clip(x0, -r, r)
        if first:
            d = denoiser.ve_derivative(x, x0, sigma)
            dt = _f32(sigma_next - sigma)
            prev_d, x_prev = d, x
            x = x + d * dt
        else:
            d = denoiser.ve_derivative(x, x0, sigma_next)
            d = (prev_d + d) / _f32(2)
            x = x_prev + d * dt
            prev_d = dt = x_prev = None
        x = model.done(x, x0)
    return x


def _run_dpmpp_2m(plan, model, x, generator, eta):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", alg. 2), data prediction, in
    lambda = log(alpha_t / sigma_t), h = lambda_t - lambda_s:
    first order:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0
    second order (midpoint): r0 = h_0 / h, D1 = (m0 - m1) / r0,
                  x_t = (sigma_t / sigma_s0) x_s - alpha_t (e^{-h} - 1) D0 - 0.5 alpha_t (e^{-h} - 1) D1
    (solver_type 'heun': + alpha_t ((e^{-h} - 1) / h + 1) D1).
    Lambdas are float32 as in diffusers: h is a difference of float32 logs, and doing it in
    float64 instead moves results by ~1e-6."""
    cfg = plan.config
    pred = plan.prediction_type
    sig = plan.sigmas
    n_full = len(plan.schedule_timesteps)
    euler_at_final = bool(cfg["euler_at_final"])
    lof = bool(cfg["lower_order_final"])
    zero_final = cfg["final_sigmas_type"] == "zero"
    heun_type = cfg["solver_type"] == "heun"
    lower_order_nums = 0
    m_prev = None
    for j, t in enumerate(plan.timesteps):
        k = plan.begin_index + j
        mo = model(x, t)
        lower_order_final = (k == n_full - 1) and (euler_at_final or (lof and n_full < 15) or zero_final)
        x0 = denoiser.vp_sigma_x0(mo, x, sig[k], pred)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            alpha_t, sigma_t = denoiser.vp_alpha_sigma(sig[k + 1])
            alpha_s0, sigma_s0 = denoiser.vp_alpha_sigma(sig[k])
            lam_t = _f32(np.log(alpha_t) - np.log(sigma_t))
            lam_s0 = _f32(np.log(alpha_s0) - np.log(sigma_s0))
            h = _f32(lam_t - lam_s0)
            em1 = _f32(np.exp(-h) - _ONE)
            ratio = _f32(sigma_t / sigma_s0)
            c0 = _f32(alpha_t * em1)
            if lower_order_nums < 1 or lower_order_final:
                x_new = ratio * x - c0 * x0
            else:
                alpha_s1, sigma_s1 = denoiser.vp_alpha_sigma(sig[k - 1])
                lam_s1 = _f32(np.log(alpha_s1) - np.log(sigma_s1))
                h_0 = _f32(lam_s0 - lam_s1)
                r0 = _f32(h_0 / h)
                d1 = _f32(_ONE / r0) * (x0 - m_prev)
                if heun_type:
                    c1 = _f32(alpha_t * _f32(_f32(em1 / h) + _ONE))
                    x_new = ratio * x - c0 * x0 + c1 * d1
                else:
                    x_new = ratio * x - c0 * x0 - _f32(_f32(0.5) * c0) * d1
        m_prev = x0
        if lower_order_nums < 2:
            lower_order_nums += 1
        x = x_new
        x = model.done(x, x0)
    return x


def _run_lcm(plan, model, x, generator, eta):
    """LCM multistep sampling (Luo et al. 2023, alg. 1): f(x, t) = c_skip(t) x + c_out(t) x0(x, t)
    with the consistency-model boundary condition (Song et al. 2023, eq. (7)):
    c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5;
    then re-noise to the next timestep: x = sqrt(a_prev) f + sqrt(1 - a_prev) z (not after the last)."""
    cfg = plan.config
    pred = plan.prediction_type
    clip = bool(cfg["clip_sample"])
    r = _f32(cfg["clip_sample_range"])
    scaling = _f32(cfg["timestep_scaling"])
    sd2 = _f32(0.5**2)
    full = plan.schedule_timesteps
    final_alpha = _f32(plan.final_alpha_cumprod)
    for j, t in enumerate(plan.timesteps):
        k = plan.begin_index + j
        t = int(t)
        mo = model(x, t)
        prev_t = int(full[k + 1]) if k + 1 < len(full) else t
        a_t = _ac(plan, t)
        a_prev = _ac(plan, prev_t) if prev_t >= 0 else final_alpha
        b_prev = _f32(_ONE - a_prev)
        st = _f32(_f32(t) * scaling)
        st2 = _f32(st * st)
        c_skip = _f32(sd2 / _f32(st2 + sd2))
        c_out = _f32(st / _f32(np.sqrt(_f32(st2 + sd2))))
        x0 = denoiser.vp_x0(mo, x, a_t, pred)
        if clip:
            x0 = np.clip(x0, -r, r)
        denoised = c_out * x0 + c_skip * x
        if k != plan.steps - 1:
            noise = _randn(generator, x.shape)
            x = _f32(np.sqrt(a_prev)) * denoised + _f32(np.sqrt(b_prev)) * noise
        else:
            x = denoised
        x = model.done(x, denoised)
    return x


_LOOPS = {
    "ddim": _run_ddim,
    "plms": _run_plms,
    "euler": _run_euler,
    "euler_a": _run_euler_a,
    "heun": _run_heun,
    "dpmpp_2m": _run_dpmpp_2m,
    "lcm": _run_lcm,
}
