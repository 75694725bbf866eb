"""Random number generators for cpuflow, without torch.

:class:`TorchCompatGenerator` reproduces, in numpy, what
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed),
dtype=torch.float32)`` returns on an x86-64 CPU, call after call on one
generator. diffusers draws every random tensor of a pipeline (initial latents,
ancestral / DDIM-eta / LCM noise, ``latent_dist.sample``) through
``diffusers.utils.torch_utils.randn_tensor``, which makes exactly such calls, so
with this generator a cpuflow seed gives the image diffusers gives.

How torch does it (ATen, CPU):

* The engine is a plain 32-bit Mersenne Twister (mt19937). ``manual_seed(s)``
  seeds it with ``init_genrand(s & 0xffffffff)`` -- only the low 32 bits of the
  64-bit seed reach the engine -- and clears the generator's cached normal
  samples. ``random()`` is one 32-bit draw; ``random64()`` is two,
  ``(first << 32) | second``. numpy's ``MT19937`` seeded as the legacy
  ``RandomState(seed)`` seeds it (``init_genrand`` too) gives these words one for
  one, so this module only adds what turns them into torch's normals.
* ``normal_`` on a contiguous float32 tensor of ``numel >= 16`` (the
  "vectorised path") first fills the tensor with float uniforms
  ``(u32 & 0xffffff) * 2**-24`` (one draw each). Then every block of 16 is
  turned into normals by Box-Muller: ``u1 = 1 - data[j]``, ``u2 = data[j+8]``,
  ``data[j] = sqrt(-2 log u1) cos(2 pi u2)``, ``data[j+8] = ... sin(...)``,
  j < 8, computed 8 lanes at a time with the Cephes-derived ``log256_ps`` /
  ``sincos256_ps`` of ``avx_mathfun.h``. On AVX512 machines torch still runs
  this AVX2 kernel (``normal_stub`` is registered without an AVX512 variant).
* When ``numel % 16 != 0`` (the "tail path") the last 16 outputs are recomputed:
  16 *more* uniforms are drawn and the last 16 elements (overlapping the last
  full block) are overwritten with a fresh Box-Muller block.
* ``numel < 16`` (the "small path") goes element by element through
  ``at::normal_distribution<double>``: two ``random64()`` draws give double
  uniforms ``(u64 & (2**53-1)) * 2**-53``; ``r = sqrt(-2 log1p(-u2))``,
  ``theta = 2 pi u1``; ``r cos theta`` is returned and ``r sin theta`` is
  *cached in the generator* and returned by the next small-path element, even
  one drawn by a later call. The vectorised path neither uses nor clears that
  cache.

The float32 arithmetic of the AVX2 kernel is reproduced operation by operation
(``_log_ps`` / ``_sincos_ps``), including the multiply-adds GCC contracted into
FMA instructions in the shipped torch wheels (without them ~1% of values are
1-2 ulp off), and the final ``fmadd(n, std=1, mean=0)`` that turns the
``-0.0`` of ``u1 == 1`` into ``+0.0``. The result is bit-exact with torch (2.13 verified)
on x86-64 (checked for every one of the 2**24 possible uniforms in both the
log and the sincos lanes). torch's other kernels -- aarch64, or
``ATEN_CPU_CAPABILITY=default`` -- use libm float functions and differ from
the AVX2 one (and from this module) by a few ulp (<= ~2e-6).

Only float32 draws are reproduced: a pipeline run by diffusers in float16
draws ``randn(dtype=float16)``, which torch computes differently.
"""
from __future__ import annotations

import math
import operator
import secrets
from typing import Sequence

import numpy as np

from .errors import InvalidArgument

__all__ = [
    "TorchCompatGenerator",
    "NumpyGenerator",
    "make_generator",
    "GENERATOR_KINDS",
]

GENERATOR_KINDS = ("torch", "numpy")

def _mt19937(seed32: int) -> np.random.MT19937:
    """numpy's mt19937 in the state ``init_genrand(seed32)`` gives, as torch's
    ``manual_seed`` leaves its engine (numpy's legacy ``RandomState(int)``
    seeding is that same ``init_genrand``)."""
    engine = np.random.MT19937()
    engine.state = {"bit_generator": "MT19937",
                    "state": np.random.RandomState(seed32).get_state(legacy=False)["state"]}
    return engine


# ----------------------------------------------------------------------------
# float32 emulation of avx_mathfun.h (log256_ps, sincos256_ps)
# ----------------------------------------------------------------------------
# GCC builds torch with -mfma and its default -ffp-contract=fast, and its
# _mm256_mul_ps / _mm256_add_ps are plain vector operators, so a multiply whose
# only use is an add/sub becomes an FMA; where two multiplies feed one add, the
# first in source order is the one fused (e.g. ``fma(y, z, e * q1)`` in log).
# Every ``_fma`` below is such a contraction; every ``*`` / ``+`` a rounded op.
_f32 = np.float32


_F32_TIE_MASK = np.uint64((1 << 29) - 1)
_F32_TIE = np.uint64(1 << 28)


def _fma(a, b, c) -> np.ndarray:
    """Correctly rounded float32 fused multiply-add ``a * b + c`` (float32 in).

    The product of two float32 is exact in float64, so ``s = a*b + c`` in
    float64 has a single rounding; rounding ``s`` to float32 is then correct
    unless ``s`` landed exactly on a float32 rounding tie while the exact sum
    did not (double rounding). Those rare elements are redone exactly: the
    float64 sum's error term (TwoSum) decides which way the tie goes."""
    p = np.multiply(a, b, dtype=np.float64)
    s = np.add(p, c, dtype=np.float64)
    out = s.astype(np.float32)
    ties = (s.view(np.uint64) & _F32_TIE_MASK) == _F32_TIE
    if ties.any():
        idx = np.nonzero(ties)
        pt = p[idx]
        ct = np.broadcast_to(np.asarray(c, np.float64), s.shape)[idx]
        st = s[idx]
        bb = st - pt
        err = (pt - (st - bb)) + (ct - bb)
        # Round to odd: nudge s one float64 ulp towards the exact value, so
        # that it is no longer a tie and rounds the way the exact sum does.
        nudged = np.where(err != 0, np.nextafter(st, np.copysign(np.inf, err)), st)
        out[idx] = nudged.astype(np.float32)
    return out


_ONE = _f32(1.0)
_ZERO = _f32(0.0)
_HALF = _f32(0.5)
_SQRTHF = _f32(0.707106781186547524)
_LOG_P = [_f32(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
    1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
    3.3333331174e-1)]
_LOG_Q1 = _f32(-2.12194440e-4)
_LOG_Q2 = _f32(0.693359375)
_DP1 = _f32(-0.78515625)
_DP2 = _f32(-2.4187564849853515625e-4)
_DP3 = _f32(-3.77489497744594108e-8)
_SINCOF = [_f32(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COSCOF = [_f32(v) for v in (2.443315711809948e-005, -1.388731625493765e-003,
                             4.166664568298827e-002)]
_FOPI = _f32(1.27323954473516)
_TWO_PI = _f32(2.0 * math.pi)
_MINUS_TWO = _f32(-2.0)

def _log_ps(x: np.ndarray) -> np.ndarray:
    """log256_ps for x in (0, 1] (no denormal / non-positive handling needed:
    the smallest argument torch passes is 2**-24)."""
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 0x7F).astype(np.float32) + _ONE
    x = ((bits & np.uint32(~0x7F800000 & 0xFFFFFFFF)) | np.uint32(0x3F000000)).view(np.float32)
    mask = x < _SQRTHF
    tmp = np.where(mask, x, _f32(0.0))
    x = x - _ONE
    e = e - np.where(mask, _ONE, _f32(0.0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = y * x
    y = _fma(y, z, e * _LOG_Q1)
    y = y - z * _HALF  # z * 0.5 is exact: fused or not, one rounding
    x = x + y
    x = _fma(e, _LOG_Q2, x)
    return x


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for x >= 0 (theta = 2 pi u, u in [0, 1))."""
    y = x * _FOPI
    j = y.astype(np.int32)  # cvttps: truncation
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    swap_sin = (j & 4) != 0
    poly = (j & 2) == 0  # True: sine from the sine polynomial
    x = _fma(y, _DP1, x)
    x = _fma(y, _DP2, x)
    x = _fma(y, _DP3, x)
    neg_cos = ((j - 2) & 4) == 0  # andnot(j-2, 4) != 0
    z = x * x
    yc = _fma(np.full_like(z, _COSCOF[0]), z, _COSCOF[1])
    yc = _fma(yc, z, _COSCOF[2])
    yc = yc * z
    yc = _fma(yc, z, -(z * _HALF))
    yc = yc + _ONE
    ys = _fma(np.full_like(z, _SINCOF[0]), z, _SINCOF[1])
    ys = _fma(ys, z, _SINCOF[2])
    ys = ys * z
    ys = _fma(ys, x, x)
    s = np.where(poly, ys, yc)
    c = np.where(poly, yc, ys)
    s = np.where(swap_sin, -s, s)
    c = np.where(neg_cos, -c, c)
    return s, c


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """normal_fill_16_AVX2 over blocks: u has shape (k, 16), float32 uniforms."""
    u1 = _ONE - u[:, :8]
    u2 = u[:, 8:]
    radius = np.sqrt(_MINUS_TWO * _log_ps(u1))
    theta = _TWO_PI * u2
    s, c = _sincos_ps(theta)
    out = np.empty_like(u)
    # torch stores fmadd(n, std, mean) = n * 1 + 0: exact, except that it
    # turns the -0.0 of radius = sqrt(-2 * +0.0) (u1 == 1) into +0.0.
    np.add(radius * c, _ZERO, out=out[:, :8])
    np.add(radius * s, _ZERO, out=out[:, 8:])
    return out


# ----------------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------------
_BM_CHUNK = 1024  # Box-Muller blocks of 16 per vectorised step (16k floats)


def _check_seed(seed) -> int:
    """The seed as torch's ``manual_seed`` takes it: an integer in
    [-2**63, 2**64), negative values wrapping modulo 2**64."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgument(
            f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    seed = operator.index(seed)
    if not -(2**63) <= seed < 2**64:
        raise InvalidArgument(
            f"seed {seed} is out of range", hint="use an integer in [0, 2**64)")
    return seed % 2**64


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise InvalidArgument(f"shape must be a tuple of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"shape must not have negative sizes, got {dims}")
    return dims


class TorchCompatGenerator:
    """The normal samples of ``torch.Generator("cpu").manual_seed(seed)``, bit for bit.

    A sequence of ``randn(shape)`` calls returns what the same sequence of
    ``torch.randn(shape, generator=g, dtype=torch.float32)`` calls returns on one
    torch CPU generator ``g`` (torch on x86-64; see the module docstring).
    ``seed`` is stored as torch's ``initial_seed()`` reports it (in [0, 2**64)).
    Not thread-safe: give each thread its own generator.
    """

    kind = "torch"

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        # Only the low 32 bits reach mt19937, as in torch.
        self._engine = _mt19937(self.seed & 0xFFFFFFFF)
        # at::CPUGeneratorImpl::next_double_normal_sample_
        self._next_double_normal: float | None = None

    def __repr__(self) -> str:
        return f"TorchCompatGenerator(seed={self.seed})"

    # -- raw engine -------------------------------------------------------
    def random_u32(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs of the engine (torch's ``random()``)."""
        return self._engine.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        """uniform_real_distribution<float>(0, 1): 24 bits of one draw each."""
        r = self.random_u32(n)
        return (r & np.uint32(0xFFFFFF)).astype(np.float32) * _f32(2.0**-24)

    def _normal_double(self) -> float:
        """One at::normal_distribution<double>(0, 1) sample (the small path)."""
        cached = self._next_double_normal
        if cached is not None:
            self._next_double_normal = None
            return cached + 0.0  # transformation::normal: x * 1 + 0
        r = [int(w) for w in self.random_u32(4)]
        mask53 = (1 << 53) - 1
        u1 = float(((r[0] << 32) | r[1]) & mask53) * 2.0**-53  # random64()
        u2 = float(((r[2] << 32) | r[3]) & mask53) * 2.0**-53
        # Python's math calls the C library, as ATen does.
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_double_normal = radius * math.sin(theta)
        # transformation::normal(x, mean=0, std=1) = x * 1 + 0 (-0.0 -> +0.0)
        return radius * math.cos(theta) + 0.0

    # -- public -----------------------------------------------------------
    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 samples of ``shape`` (C-contiguous)."""
        dims = _check_shape(shape)
        n = math.prod(dims)
        if n < 16:
            vals = [self._normal_double() for _ in range(n)]
            return np.array(vals, dtype=np.float64).astype(np.float32).reshape(dims)
        u = self._uniform_f32(n)
        full = n // 16
        blocks = u[: full * 16].reshape(full, 16)
        out = np.empty(n, np.float32)
        out_blocks = out[: full * 16].reshape(full, 16)
        for i in range(0, full, _BM_CHUNK):
            out_blocks[i : i + _BM_CHUNK] = _box_muller_16(blocks[i : i + _BM_CHUNK])
        if n % 16:
            # torch draws 16 more uniforms and recomputes the last 16 outputs.
            tail = self._uniform_f32(16).reshape(1, 16)
            out[n - 16 :] = _box_muller_16(tail).reshape(16)
        return out.reshape(dims)


class NumpyGenerator:
    """Normal samples from ``np.random.Generator(np.random.PCG64(seed))``.

    Faster than :class:`TorchCompatGenerator` and statistically as good, but
    **not diffusers-compatible**: a seed gives a different image than it does in
    diffusers / torch.
    """

    kind = "numpy"

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def __repr__(self) -> str:
        return f"NumpyGenerator(seed={self.seed})"

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 samples of ``shape`` (C-contiguous)."""
        dims = _check_shape(shape)
        return np.ascontiguousarray(self._rng.standard_normal(dims, dtype=np.float32))


_KINDS = {"torch": TorchCompatGenerator, "numpy": NumpyGenerator}


def make_generator(kind: str | None = "torch", seed: int | None = None):
    """A generator of ``kind`` ("torch", the default, or "numpy") seeded with ``seed``.

    ``kind=None`` means "torch". ``seed=None`` draws a fresh seed in
    [0, 2**32) from the OS; the generator's ``.seed`` tells which, so the run
    can be repeated.
    """
    name = "torch" if kind is None else kind
    if not isinstance(name, str) or name.strip().lower() not in _KINDS:
        raise InvalidArgument(
            f"unknown generator kind {kind!r}",
            hint="valid kinds: " + ", ".join(GENERATOR_KINDS))
    if seed is None:
        seed = secrets.randbits(32)
    return _KINDS[name.strip().lower()](seed)
