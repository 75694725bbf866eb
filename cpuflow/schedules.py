"""Noise schedules: betas, alphas_cumprod, sigmas and timestep spacings.

Pure functions (numpy only) that reproduce, number for number, what diffusers'
schedulers compute in ``__init__`` and ``set_timesteps``. The samplers in
:mod:`cpuflow.samplers` build their tables from here.

Precision — where dtype matters (for agreement with diffusers to ~1e-6):

* diffusers keeps ``betas`` / ``alphas_cumprod`` in float32 torch tensors.
  ``torch.linspace(..., dtype=float32)`` computes ``step`` in float32 and each
  element as ``start + step * i`` (or ``end - step * (n-1-i)`` for the second
  half) with one rounding (FMA), see :func:`torch_linspace_f32`.
  ``torch.cumprod`` on CPU accumulates float32 in float64 and rounds each
  partial product to float32. Recomputing the cumprod in float64 from float64
  betas instead drifts by up to ~1e-5 relative at t=999, far more than the
  tolerance, so :class:`NoiseSchedule` stores the float32 values (held in a
  float64 array so that downstream float64 maths sees the same numbers).
* Sigma tables (``((1 - a) / a) ** 0.5``) are float32 in diffusers; the
  interpolation (``np.interp``), Karras sigmas and ``_sigma_to_t`` run in
  float64 numpy and are cast to float32 at the end, as here.
* Timesteps: DDIM / PNDM / DPM-Solver / LCM use integers; Euler, Euler-a and
  Heun use float32 timesteps (``linspace`` spacing gives fractional ones such
  as 946.42105, Karras sigmas give fractional ones for all spacings).
* Residual differences are ulp-level: torch's vectorised float32 ``sqrt`` /
  ``log`` / ``exp`` CPU kernels (MKL VML / Sleef) are not always correctly
  rounded (measured here, AMD EPYC + AVX512: ``torch.sqrt`` of a tensor is
  1 ulp off IEEE sqrt for ~19% of inputs; 0-d tensors are exact), so the
  float32 sigma table can differ by 1 ulp, bit-identity with torch is neither
  possible nor stable across CPUs, and Karras timesteps computed from that
  table (Euler / Heun) can differ by 1 float32 ulp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidArgument

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5): rho = 7

_f32 = np.float32


# --- betas -------------------------------------------------------------------------
def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    ATen's linspace kernel: ``step = (float(end) - float(start)) / (steps - 1)``
    in float32; element i is ``start + step * i`` for ``i < steps // 2`` and
    ``end - step * (steps - 1 - i)`` otherwise, each rounded once (the
    vectorised kernel fuses the multiply-add). A float64 evaluation rounded to
    float32 reproduces that.
    """
    steps = int(steps)
    if steps <= 0:
        return np.zeros(0, dtype=np.float32)
    s, e = _f32(start), _f32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    step = _f32(_f32(e - s) / _f32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"
) -> np.ndarray:
    """Betas that discretise ``alpha_bar(t)`` (Nichol & Dhariwal 2021, eq. 17), float32.

    Evaluated in Python floats and cast to float32, as diffusers' ``betas_for_alpha_bar``.
    """
    if alpha_transform_type == "cosine":

        def alpha_bar_fn(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "exp":

        def alpha_bar_fn(t: float) -> float:
            return math.exp(t * -12.0)

    elif alpha_transform_type == "laplace":

        def alpha_bar_fn(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    else:
        raise InvalidArgument(
            f"alpha_transform_type {alpha_transform_type!r} is not known; valid: cosine, exp, laplace"
        )
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, arXiv 2305.08891, Algorithm 1). float32."""
    betas = np.asarray(betas, dtype=np.float32)
    alphas = _f32(1.0) - betas
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(alphas))
    a0 = alphas_bar_sqrt[0].copy()
    aT = alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = alphas_bar_sqrt - aT
    alphas_bar_sqrt = alphas_bar_sqrt * _f32(a0 / _f32(a0 - aT))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (_f32(1.0) - alphas).astype(np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor: accumulates in float64, stores float32."""
    return np.cumprod(np.asarray(alphas, dtype=np.float32).astype(np.float64)).astype(np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None = None,
) -> np.ndarray:
    """The float32 betas a diffusers scheduler's ``__init__`` builds."""
    if trained_betas is not None:
        try:
            betas = np.asarray(trained_betas, dtype=np.float64).astype(np.float32)
        except (TypeError, ValueError):
            raise InvalidArgument("trained_betas must be a list of numbers") from None
        if betas.ndim != 1 or betas.size < 2 or not np.all((betas >= 0) & (betas <= 1)):
            raise InvalidArgument(
                f"trained_betas has shape {betas.shape}; it must be a list of at least 2 numbers in [0, 1]"
            )
        return betas
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        b = torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return b * b
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="cosine")
    if beta_schedule == "exp":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="exp")
    raise InvalidArgument(
        f"beta_schedule {beta_schedule!r} is not known; valid: {', '.join(BETA_SCHEDULES)}"
    )


# --- the schedule ------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete VP diffusion ``q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I)``.

    ``alphas_cumprod`` (a_t, t = 0..N-1) holds diffusers' float32 values in a
    float64 array. ``sigmas`` are the equivalent VE noise levels
    ``sigma_t = sqrt((1 - a_t) / a_t)`` (Karras et al. 2022, Table 1) as
    diffusers' float32 table, ascending in t.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    num_train_timesteps: int
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(
        cls, scheduler_config: Mapping[str, Any], *, clamp_terminal_alpha: bool = False
    ) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict (``scheduler_config.json`` content).

        Missing keys take DDIMScheduler's defaults. ``clamp_terminal_alpha``
        reproduces Euler / Euler-a / DPM-Solver, which set
        ``alphas_cumprod[-1] = 2**-24`` when ``rescale_betas_zero_snr`` is on
        (so that sigma stays finite).
        """
        cfg = dict(scheduler_config)
        n = _as_int(cfg.get("num_train_timesteps", 1000), "num_train_timesteps", 2)
        betas = make_betas(
            n,
            float(cfg.get("beta_start", 0.0001)),
            float(cfg.get("beta_end", 0.02)),
            str(cfg.get("beta_schedule", "linear")),
            cfg.get("trained_betas"),
        )
        if betas.size != n:
            raise InvalidArgument(
                f"trained_betas has {betas.size} values but num_train_timesteps is {n}; they must match"
            )
        zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        ac = _cumprod_f32(_f32(1.0) - betas)
        if zero_snr and clamp_terminal_alpha:
            ac[-1] = _f32(2.0**-24)
        pred = str(cfg.get("prediction_type", "epsilon"))
        b64 = betas.astype(np.float64)
        a64 = ac.astype(np.float64)
        b64.setflags(write=False)
        a64.setflags(write=False)
        return cls(betas=b64, alphas_cumprod=a64, num_train_timesteps=n, prediction_type=pred)

    # float32 views, as diffusers holds them
    @property
    def alphas_cumprod_f32(self) -> np.ndarray:
        return self.alphas_cumprod.astype(np.float32)

    @property
    def sigmas(self) -> np.ndarray:
        """float32 ``((1 - a) / a) ** 0.5`` for t = 0..N-1 (ascending)."""
        a = self.alphas_cumprod_f32
        with np.errstate(divide="ignore", over="ignore"):
            return np.sqrt((_f32(1.0) - a) / a)

    @property
    def log_sigmas(self) -> np.ndarray:
        """``np.log`` of the float32 sigma table (float32), the grid of ``_sigma_to_t``."""
        with np.errstate(divide="ignore"):
            return np.log(self.sigmas)

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """Sigma at (possibly fractional) timesteps by linear interpolation in t (float64)."""
        s = self.sigmas
        return np.interp(np.asarray(timesteps), np.arange(0, len(s)), s)

    def sigma_to_t(self, sigmas: np.ndarray) -> np.ndarray:
        """Timesteps for sigmas, interpolating linearly in log-sigma (float64)."""
        log_sigmas = self.log_sigmas
        return np.array([sigma_to_t(s, log_sigmas) for s in np.asarray(sigmas, dtype=np.float64)])

    def final_alpha_cumprod(self, set_alpha_to_one: bool) -> float:
        """a_prev for the step past t=0 (DDIM / PNDM / LCM): 1.0 or a_0."""
        return 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InvalidArgument(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")
    return int(value)


# --- sigma <-> t ---------------------------------------------------------------------
def sigma_to_t(sigma: float | np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t``: piecewise-linear interpolation of t in log-sigma.

    ``log_sigmas`` is the float32 log of the training sigma table (ascending);
    the arithmetic is float64 (mixed float32 / float64 as in diffusers).
    """
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022, eq. (5): ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.

    float64, with diffusers' operation order (``_convert_to_karras``).
    """
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = float(sigma_min) ** (1 / rho)
    max_inv_rho = float(sigma_max) ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# --- timestep spacings -----------------------------------------------------------------
def _check_spacing(spacing: str) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise InvalidArgument(
            f"timestep_spacing {spacing!r} is not known; valid: {', '.join(TIMESTEP_SPACINGS)}"
        )


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, steps: int, steps_offset: int = 0, *, rounded: bool = True
) -> np.ndarray:
    """Descending timesteps as DDIM / PNDM (``rounded=True``, int64) or Euler / Euler-a /
    Heun (``rounded=False``, float32) ``set_timesteps`` compute them.

    Table 2 of Lin et al. 2023 (arXiv 2305.08891) names the spacings:
    ``linspace``: linspace(0, N-1, steps) (rounded for DDIM, fractional for Euler);
    ``leading``: arange(steps) * (N // steps) + steps_offset;
    ``trailing``: round(arange(N, 0, -N / steps)) - 1.
    """
    _check_spacing(spacing)
    n = num_train_timesteps
    if spacing == "linspace":
        if rounded:
            return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        step_ratio = n // steps
        ts = (np.arange(0, steps) * step_ratio).round()[::-1].copy()
        if rounded:
            ts = ts.astype(np.int64)
        else:
            ts = ts.astype(np.float32)
        ts += steps_offset
        return ts
    step_ratio = n / steps
    ts = np.round(np.arange(n, 0, -step_ratio))
    ts = ts.astype(np.int64) if rounded else ts.astype(np.float32)
    ts -= 1
    return ts


def dpm_timesteps(
    spacing: str, num_train_timesteps: int, steps: int, steps_offset: int = 0, last_timestep: int | None = None
) -> np.ndarray:
    """Descending int64 timesteps as DPMSolverMultistepScheduler.set_timesteps computes them.

    Differs from :func:`spaced_timesteps`: ``linspace`` and ``leading`` space
    ``steps + 1`` points and drop the last (so leading uses N // (steps + 1)),
    and ``last_timestep`` comes from ``lambda_min_clipped``.
    """
    _check_spacing(spacing)
    last = num_train_timesteps if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = last // (steps + 1)
        ts = (np.arange(0, steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += steps_offset
        return ts
    step_ratio = num_train_timesteps / steps
    ts = np.arange(last, 0, -step_ratio).round().copy().astype(np.int64)
    ts -= 1
    return ts


def lcm_timesteps(num_train_timesteps: int, steps: int, original_inference_steps: int = 50) -> np.ndarray:
    """LCMScheduler.set_timesteps: ``steps`` points of the ``original_inference_steps``
    skipping-step grid (Luo et al. 2023, sec. 4.3): t_k = k * (N // orig) - 1, descending."""
    k = num_train_timesteps // original_inference_steps
    origin = np.asarray(list(range(1, original_inference_steps + 1))) * k - 1
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.int64)
