"""The one place that knows what the UNet predicts.

A raw model output ``F`` (after classifier-free guidance) is turned into the
denoised estimate ``x0`` and/or the noise estimate ``eps`` given the current
noise level, for the three parametrisations diffusers supports:

* ``epsilon``      (Ho et al. 2020):      F = eps
* ``v_prediction`` (Salimans & Ho 2022, eq. (7); Imagen Video sec. 2.4):
                                          F = v = sqrt(a) eps - sqrt(1 - a) x0
* ``sample``                              F = x0

Two frames are used by the samplers:

* VP frame (DDIM, PLMS, LCM, DPM-Solver): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``
  with ``a_t = alphas_cumprod[t]`` (DPM-Solver writes ``alpha_t = sqrt(a_t)``,
  ``sigma_t = sqrt(1 - a_t)``).
* VE / "k-diffusion" frame (Euler, Euler-a, Heun): ``x = x0 + sigma eps`` with
  ``sigma = sqrt((1 - a) / a)``, i.e. ``x = x_t / sqrt(a_t)``. The UNet was
  trained on VP inputs, so its input is scaled by
  ``c_in = 1 / sqrt(sigma^2 + 1) = sqrt(a_t)`` (Karras et al. 2022, Table 1).

All arithmetic is float32 with the operand order of the diffusers scheduler it
mirrors (named in each docstring), so results agree with diffusers to a few
float32 ulps. Scalars are ``np.float32`` (NEP 50 would otherwise promote
float32 arrays to float64).
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_f32 = np.float32
_ONE = np.float32(1.0)


def check_prediction_type(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES) -> str:
    if prediction_type not in allowed:
        raise InvalidArgument(
            f"prediction_type {prediction_type!r} is not supported here; valid: {', '.join(allowed)}"
        )
    return prediction_type


# --- VE (sigma) frame ---------------------------------------------------------------
def c_in(sigma: np.float32) -> np.float32:
    """``sqrt(sigma^2 + 1)``: the divisor of the UNet input in the VE frame (Karras et al. 2022, Table 1)."""
    sigma = _f32(sigma)
    return _f32(np.sqrt(_f32(sigma * sigma + _ONE)))


def scale_model_input(x: np.ndarray, sigma: np.float32) -> np.ndarray:
    """``x / sqrt(sigma^2 + 1)`` (Euler / Euler-a / Heun ``scale_model_input``)."""
    return x / c_in(sigma)


def ve_x0(model_output: np.ndarray, x: np.ndarray, sigma: np.float32, prediction_type: str) -> np.ndarray:
    """x0 in the VE frame ``x = x0 + sigma eps`` (EulerDiscreteScheduler.step).

    epsilon: ``x0 = x - sigma eps``.
    v:       with ``x_t = x / sqrt(1 + sigma^2)``, ``sqrt(a) = 1 / sqrt(1 + sigma^2)``,
             ``x0 = sqrt(a) x_t - sqrt(1 - a) v = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)``.
    sample:  ``x0 = F``.
    """
    sigma = _f32(sigma)
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        s2p1 = _f32(sigma * sigma + _ONE)
        return model_output * _f32(-sigma / _f32(np.sqrt(s2p1))) + (x / s2p1)
    if prediction_type == "sample":
        return model_output
    raise InvalidArgument(f"prediction_type {prediction_type!r} is not known; valid: {', '.join(PREDICTION_TYPES)}")


def ve_derivative(x: np.ndarray, x0: np.ndarray, sigma: np.float32) -> np.ndarray:
    """``dx/dsigma = (x - x0) / sigma`` — the probability-flow ODE in the VE frame
    (Karras et al. 2022, eq. (4) with s(t)=1, sigma(t)=t; k-diffusion ``to_d``)."""
    return (x - x0) / _f32(sigma)


# --- VP frame, from alphas_cumprod (DDIM / PLMS / LCM) --------------------------------
def vp_x0_eps(
    model_output: np.ndarray, x: np.ndarray, alpha_prod_t: np.float32, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(x0, eps)`` from ``x_t = sqrt(a) x0 + sqrt(1-a) eps`` (DDIMScheduler.step; DDIM eq. (12)'s
    "predicted x0" term ``(x_t - sqrt(1-a_t) eps) / sqrt(a_t)``)."""
    a = _f32(alpha_prod_t)
    b = _f32(_ONE - a)
    sa, sb = _f32(np.sqrt(a)), _f32(np.sqrt(b))
    if prediction_type == "epsilon":
        return (x - sb * model_output) / sa, model_output
    if prediction_type == "v_prediction":
        return sa * x - sb * model_output, sa * model_output + sb * x
    if prediction_type == "sample":
        return model_output, (x - sa * model_output) / sb
    raise InvalidArgument(f"prediction_type {prediction_type!r} is not known; valid: {', '.join(PREDICTION_TYPES)}")


def vp_x0(model_output: np.ndarray, x: np.ndarray, alpha_prod_t: np.float32, prediction_type: str) -> np.ndarray:
    """x0 only (LCMScheduler.step's ``predicted_original_sample``)."""
    a = _f32(alpha_prod_t)
    return _x0(model_output, x, _f32(np.sqrt(a)), _f32(np.sqrt(_f32(_ONE - a))), prediction_type)


def _x0(model_output: np.ndarray, x: np.ndarray, alpha: np.float32, sigma: np.float32,
        prediction_type: str) -> np.ndarray:
    """x0 from x_t = alpha x0 + sigma eps: epsilon -> (x - sigma eps) / alpha;
    v = alpha eps - sigma x0 -> alpha x - sigma v (Salimans & Ho 2022, sec. 4)."""
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise InvalidArgument(f"prediction_type {prediction_type!r} is not known; valid: {', '.join(PREDICTION_TYPES)}")


def vp_eps(model_output: np.ndarray, x: np.ndarray, alpha_prod_t: np.float32, prediction_type: str) -> np.ndarray:
    """eps only (PNDMScheduler._get_prev_sample; v -> eps = sqrt(a) v + sqrt(1-a) x_t)."""
    if prediction_type == "epsilon":
        return model_output
    a = _f32(alpha_prod_t)
    if prediction_type == "v_prediction":
        return _f32(np.sqrt(a)) * model_output + _f32(np.sqrt(_f32(_ONE - a))) * x
    if prediction_type == "sample":
        return (x - _f32(np.sqrt(a)) * model_output) / _f32(np.sqrt(_f32(_ONE - a)))
    raise InvalidArgument(f"prediction_type {prediction_type!r} is not known; valid: {', '.join(PREDICTION_TYPES)}")


# --- VP frame, from sigma (DPM-Solver) ------------------------------------------------
def vp_alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """DPM-Solver's ``(alpha_t, sigma_t) = (1 / sqrt(sigma^2 + 1), sigma * alpha_t)`` (float32,
    DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t)."""
    sigma = _f32(sigma)
    alpha_t = _f32(_ONE / _f32(np.sqrt(_f32(sigma * sigma + _ONE))))
    return alpha_t, _f32(sigma * alpha_t)


def vp_sigma_x0(model_output: np.ndarray, x: np.ndarray, sigma: np.float32, prediction_type: str) -> np.ndarray:
    """x0 for DPM-Solver++ (Lu et al. 2022, sec. 3: the data-prediction model
    ``x_theta = (x_t - sigma_t eps) / alpha_t``; DPMSolverMultistepScheduler.convert_model_output)."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return _x0(model_output, x, alpha_t, sigma_t, prediction_type)
