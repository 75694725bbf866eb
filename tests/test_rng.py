"""cpuflow.rng: torch-compatible normal samples without torch.

The golden tests need only numpy: tests/fixtures/rng/ was written by
scripts/regen_rng_golden.py from torch.randn on CPU generators. The live tests
compare against torch (and diffusers' randn_tensor) when they are installed.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pytest

from cpuflow import rng
from cpuflow.errors import InvalidArgument
from cpuflow.rng import NumpyGenerator, TorchCompatGenerator, make_generator

FIXTURES = Path(__file__).parent / "fixtures" / "rng"
META = json.loads((FIXTURES / "golden.json").read_text())
with np.load(FIXTURES / "golden.npz") as _npz:
    ARRAYS = {k: _npz[k] for k in _npz.files}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def _check_against(prefix: str, info: dict, got: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.flags.c_contiguous
    assert list(got.shape) == info["shape"]
    flat = got.reshape(-1)
    if info["stored"] == "full":
        pairs = [(flat, ARRAYS[prefix + "full"])]
    else:
        pairs = [
            (flat[: META["edge"]], ARRAYS[prefix + "head"]),
            (flat[-META["edge"]:], ARRAYS[prefix + "tail"]),
            (flat[:: META["stride"]], ARRAYS[prefix + "strided"]),
        ]
    for ours, ref in pairs:
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
        # bit-exact, including the sign of zero
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert math.isclose(float(flat.astype(np.float64).sum()), info["sum"],
                        rel_tol=0, abs_tol=1e-6 * max(1, flat.size))
    assert _sha(flat) == info["sha256"], "not bit-exact with torch"


CASES = META["cases"]


def _per_image(seeds, shape) -> np.ndarray:
    """A batch as the pipelines draw it (and diffusers' randn_tensor with a list of
    generators): image i from its own generator, shape[1:] each."""
    if len(seeds) == 1:  # diffusers: a list of one generator draws the whole shape
        return TorchCompatGenerator(seeds[0]).randn(shape)
    return np.concatenate([TorchCompatGenerator(s).randn((1,) + tuple(shape[1:])) for s in seeds])


# ---------------------------------------------------------------- goldens ----
class TestGolden:
    @pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
    def test_case(self, case):
        g = TorchCompatGenerator(case["seed"])
        assert g.seed == case["seed"]
        for j, (shape, info) in enumerate(zip(case["shapes"], case["calls"])):
            got = g.randn(tuple(shape))
            _check_against(f"{case['name']}/{j}/", info, got)

    def test_batch(self):
        b = META["batch"]
        got = _per_image(b["seeds"], tuple(b["shape"]))
        _check_against("batch/0/", b["call"], got)

    def test_goldens_cover_every_path(self):
        sizes = {math.prod(s) for c in CASES for s in c["shapes"]}
        assert any(n < 16 for n in sizes)
        assert 16 in sizes
        assert any(n > 16 and n % 16 == 0 for n in sizes)
        assert any(n > 16 and n % 16 for n in sizes)
        assert any(len(c["shapes"]) > 5 for c in CASES)
        assert {0, 1, 42, 2**32 - 1} <= {c["seed"] for c in CASES}
        assert any(c["seed"] >= 2**32 for c in CASES)

    def test_fixture_size(self):
        total = sum(p.stat().st_size for p in FIXTURES.iterdir())
        assert total < 200 * 1024


# ------------------------------------------------------- torch behaviours ----
class TestTorchSemantics:
    """Properties of torch's generator that hold without torch at hand."""

    def test_only_low_32_bits_of_seed_reach_the_engine(self):
        a = TorchCompatGenerator(5).randn((40,))
        b = TorchCompatGenerator(5 + 2**32).randn((40,))
        np.testing.assert_array_equal(a, b)

    def test_negative_seed_wraps_like_torch(self):
        g = TorchCompatGenerator(-1)
        assert g.seed == 2**64 - 1
        np.testing.assert_array_equal(g.randn((20,)), TorchCompatGenerator(2**64 - 1).randn((20,)))

    def test_mt19937_reference_output(self):
        # std::mt19937 with the default seed 5489: the 10000th output is 4123659995
        g = TorchCompatGenerator(5489)
        assert int(g.random_u32(10000)[-1]) == 4123659995

    def test_random_u32_is_one_stream_whatever_the_chunking(self):
        a = TorchCompatGenerator(3).random_u32(3000)
        g = TorchCompatGenerator(3)
        parts = [g.random_u32(n) for n in (1, 622, 1, 1, 700, 0, 1248, 427)]
        np.testing.assert_array_equal(a, np.concatenate(parts))

    def test_small_path_caches_second_sample_across_calls(self):
        # randn(1) returns r*cos and caches r*sin; the next small call returns
        # that cached value without drawing, even after a vectorised call.
        g1 = TorchCompatGenerator(11)
        two = g1.randn((2,))
        g2 = TorchCompatGenerator(11)
        first = g2.randn((1,))
        g2.randn((64,))  # does not touch the cache
        second = g2.randn((1,))
        assert first[0] == two[0] and second[0] == two[1]

    def test_tail_draws_sixteen_more(self):
        # numel % 16 != 0 consumes numel + 16 words; numel % 16 == 0 consumes numel
        for n, used in ((32, 32), (33, 49), (17, 33)):
            g = TorchCompatGenerator(9)
            g.randn((n,))
            h = TorchCompatGenerator(9)
            h.random_u32(used)
            np.testing.assert_array_equal(g.random_u32(5), h.random_u32(5))

    def test_zero_sized_and_scalar_shapes(self):
        g = TorchCompatGenerator(0)
        assert g.randn((0,)).shape == (0,)
        assert g.randn((2, 0, 3)).shape == (2, 0, 3)
        s = g.randn(())
        assert s.shape == () and s.dtype == np.float32
        assert g.randn(5).shape == (5,)

    def test_fma_tie_is_rounded_like_hardware(self):
        a = np.array([1 + 2**-23] * 2, np.float32)
        b = np.array([2**-24 * (1 - 2**-23), 2**-24 * (1 + 2**-23)], np.float32)
        c = np.array([1 + 2**-23] * 2, np.float32)
        got = rng._fma(a, b, c) - np.float32(1)
        np.testing.assert_array_equal(got, np.array([2**-23, 2**-22], np.float32))


# --------------------------------------------------------------- the API ----
class TestApi:
    @pytest.mark.parametrize("bad", [1.5, "3", None, True, [1]])
    def test_seed_type(self, bad):
        for cls in (TorchCompatGenerator, NumpyGenerator):
            with pytest.raises(InvalidArgument):
                cls(bad)

    @pytest.mark.parametrize("bad", [2**64, -(2**63) - 1])
    def test_seed_range(self, bad):
        with pytest.raises(InvalidArgument):
            TorchCompatGenerator(bad)

    def test_numpy_integer_seed(self):
        np.testing.assert_array_equal(TorchCompatGenerator(np.uint64(7)).randn((20,)),
                                      TorchCompatGenerator(7).randn((20,)))

    @pytest.mark.parametrize("bad", [(-1, 3), (2.0,), "abc"])
    def test_bad_shape(self, bad):
        with pytest.raises(InvalidArgument):
            TorchCompatGenerator(0).randn(bad)

    def test_make_generator(self):
        g = make_generator("torch", 42)
        assert isinstance(g, TorchCompatGenerator) and g.seed == 42
        assert isinstance(make_generator(None, 1), TorchCompatGenerator)
        assert isinstance(make_generator(seed=1), TorchCompatGenerator)
        assert isinstance(make_generator("numpy", 1), NumpyGenerator)
        r = make_generator("torch")
        assert 0 <= r.seed < 2**32

    def test_make_generator_unknown_kind(self):
        with pytest.raises(InvalidArgument) as ei:
            make_generator("cuda", 1)
        msg = str(ei.value)
        assert "cuda" in msg and "torch" in msg and "numpy" in msg

    def test_numpy_generator(self):
        a = NumpyGenerator(3).randn((2, 4, 32, 32))
        b = NumpyGenerator(3).randn((2, 4, 32, 32))
        assert a.dtype == np.float32 and a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
        assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05
        assert not np.array_equal(a, TorchCompatGenerator(3).randn((2, 4, 32, 32)))

    def test_vectorised(self):
        """Not a timing assertion: counts that the work is done in numpy blocks
        (the engine's words in one call, one Box-Muller step per 1024 blocks)."""
        calls = {"bm": 0}
        bm = rng._box_muller_16

        def count_bm(u):
            calls["bm"] += 1
            return bm(u)

        shape = (1, 4, 128, 128)
        n = math.prod(shape)
        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(rng, "_box_muller_16", count_bm)
            t0 = time.perf_counter()
            out = TorchCompatGenerator(0).randn(shape)
            elapsed = time.perf_counter() - t0
        finally:
            mp.undo()
        assert out.shape == shape
        assert calls["bm"] == -(-(n // 16) // rng._BM_CHUNK)
        print(f"randn{shape}: {elapsed * 1000:.1f} ms")


# ------------------------------------------------------------ live torch ----
def _torch():
    torch = pytest.importorskip("torch")
    return torch


def _exact_expected(torch) -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


class TestLiveTorch:
    def _compare(self, torch, seed, shapes):
        g = torch.Generator("cpu").manual_seed(seed)
        ours = TorchCompatGenerator(seed)
        assert ours.seed == g.initial_seed()
        exact = _exact_expected(torch)
        for shape in shapes:
            ref = torch.randn(shape, generator=g, dtype=torch.float32).numpy()
            got = ours.randn(shape)
            assert got.shape == ref.shape and got.dtype == np.float32
            if ref.size:
                # torch's non-AVX2 kernel (aarch64, ATEN_CPU_CAPABILITY=default)
                # uses libm float functions: a few ulp off the AVX2 one.
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 if exact else 1e-5)
            if exact:
                np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))

    @pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1, -5])
    def test_shapes(self, seed):
        torch = _torch()
        shapes = [(1,), (7,), (15,), (16,), (17,), (47,), (48,), (1, 4, 64, 64),
                  (2, 4, 8, 8), (1,), (3, 5, 7), (4, 4, 96, 96), (2,)]
        self._compare(torch, seed, shapes)

    def test_random_sequences(self):
        torch = _torch()
        r = np.random.default_rng(1234)
        for seed in r.integers(0, 2**63, 6):
            sizes = r.choice([0, 1, 2, 3, 5, 9, 15, 16, 17, 31, 32, 33, 200, 1000, 1023], 25)
            self._compare(torch, int(seed), [(int(n),) for n in sizes])

    def test_seed_acceptance_matches_torch(self):
        torch = _torch()
        for seed in (0, 2**64 - 1, -(2**63), 17):
            assert TorchCompatGenerator(seed).seed == torch.Generator().manual_seed(seed).initial_seed()
        for seed in (2**64, -(2**63) - 1):
            with pytest.raises(Exception):
                torch.Generator().manual_seed(seed)
            with pytest.raises(InvalidArgument):
                TorchCompatGenerator(seed)


class TestLiveDiffusers:
    @pytest.mark.parametrize("seeds,shape", [
        ([0, 1], (2, 4, 64, 64)),
        ([42, 43, 44], (3, 4, 8, 8)),
        ([3, 4], (2, 3)),            # per-image numel < 16: small path per generator
        ([9], (2, 4, 8, 8)),         # a list of one: the whole shape from it
    ])
    def test_randn_tensor_with_generator_list(self, seeds, shape):
        torch = _torch()
        tu = pytest.importorskip("diffusers.utils.torch_utils")
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        ref = tu.randn_tensor(shape, generator=gens, dtype=torch.float32).numpy()
        got = _per_image(seeds, shape)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 if _exact_expected(torch) else 1e-5)
        if _exact_expected(torch):
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))

    def test_randn_tensor_single_generator_sequence(self):
        # a pipeline: initial latents, then per-step noise, on one generator
        torch = _torch()
        tu = pytest.importorskip("diffusers.utils.torch_utils")
        g = torch.Generator("cpu").manual_seed(1234)
        ours = TorchCompatGenerator(1234)
        for shape in [(1, 4, 64, 64)] + [(1, 4, 64, 64)] * 3:
            ref = tu.randn_tensor(shape, generator=g, dtype=torch.float32).numpy()
            np.testing.assert_allclose(ours.randn(shape), ref, rtol=0, atol=1e-5)
