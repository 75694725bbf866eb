#!/usr/bin/env python
"""Regenerate the golden arrays of tests/test_rng.py with torch.

    python scripts/regen_rng_golden.py [--out tests/fixtures/rng] [--check]

Writes ``golden.json`` (the cases, per-call sha256 of the float32 bytes and
sums) and ``golden.npz`` (the values: whole arrays of up to 512 elements;
for bigger ones the first 64, the last 64 and every 997th value) from
``torch.randn(shape, generator=g, dtype=torch.float32)`` on CPU generators.
Each case is a sequence of calls on ONE generator (a single call is a sequence
of one), so the goldens also pin how state carries from call to call.

Needs torch (and diffusers for the batch case, else the same per-image loop
randn_tensor runs). Run it on x86-64 with torch's AVX2/AVX512 kernels: that is
what cpuflow.rng reproduces; the script refuses other CPU capabilities.
``--check`` compares cpuflow.rng against torch for every case instead of
writing anything; ``--exhaustive`` feeds torch's Box-Muller kernel every one of
the 2**24 possible float uniforms, in the log lanes and in the sincos lanes, by
writing chosen mt19937 states into a torch generator (some seconds), and
compares cpuflow.rng's float32 emulation with it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FULL_MAX = 512
EDGE = 64
STRIDE = 997

SEEDS = [0, 1, 42, 2**32 - 1, 2**63 + 12345]
SINGLE_SHAPES = [
    (1,), (2,), (3,), (15,),          # numel < 16: the double Box-Muller path
    (16,), (32,), (4, 8),             # multiples of 16: the vectorised path
    (17,), (31,), (100,), (3, 5, 7),  # numel % 16 != 0: the tail path
    (2, 4, 8, 8),
    (1, 4, 64, 64),
]
# One generator, calls of mixed sizes: the cached second small-path sample must
# survive the vectorised calls in between, and tails must consume 16 extra draws.
SEQUENCE = [
    (3,), (1, 4, 8, 8), (1,), (17,), (5,), (2, 4, 8, 8), (1,), (100,),
    (15,), (1, 4, 64, 64), (2,), (33,), (1,),
]
BATCH_SEEDS = [42, 43, 7]
BATCH_SHAPE = (3, 4, 16, 16)


def case_list() -> list[dict]:
    cases = []
    for seed in SEEDS:
        for shape in SINGLE_SHAPES:
            name = f"s{seed}_" + "x".join(map(str, shape))
            cases.append({"name": name, "seed": seed, "shapes": [list(shape)]})
        cases.append({"name": f"s{seed}_seq", "seed": seed,
                      "shapes": [list(s) for s in SEQUENCE]})
    return cases


def summarize(prefix: str, arr: np.ndarray, arrays: dict) -> dict:
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    info = {
        "shape": list(arr.shape),
        "sha256": hashlib.sha256(flat.astype("<f4").tobytes()).hexdigest(),
        "sum": float(flat.astype(np.float64).sum()),
        "sumsq": float((flat.astype(np.float64) ** 2).sum()),
    }
    if flat.size <= FULL_MAX:
        arrays[prefix + "full"] = flat
        info["stored"] = "full"
    else:
        arrays[prefix + "head"] = flat[:EDGE]
        arrays[prefix + "tail"] = flat[-EDGE:]
        arrays[prefix + "strided"] = flat[::STRIDE]
        info["stored"] = "sampled"
    return info


def _untemper(y: np.ndarray) -> np.ndarray:
    """Inverse of the mt19937 output tempering."""
    y = y.astype(np.uint32)
    y ^= y >> np.uint32(18)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    x = y.copy()
    for _ in range(5):
        x = y ^ ((x << np.uint32(7)) & np.uint32(0x9D2C5680))
    y, x = x, x.copy()
    for _ in range(3):
        x = y ^ (x >> np.uint32(11))
    return x


def exhaustive(torch) -> int:
    sys.path.insert(0, str(ROOT))
    from cpuflow import rng

    # numpy's mt19937 at pos 0 outputs its 624 state words tempered, without a twist
    probe = np.random.default_rng(0).integers(0, 2**32, 624, dtype=np.uint64).astype(np.uint32)
    engine = np.random.MT19937()
    engine.state = {"bit_generator": "MT19937", "state": {"key": probe, "pos": 0}}
    assert (_untemper(engine.random_raw(624).astype(np.uint32)) == probe).all()
    g = torch.Generator("cpu").manual_seed(0)
    base = g.get_state().numpy().copy()
    # CPUGeneratorImplState: u64 seed, i32 left, i32 seeded, u64 next,
    # u64 state[624], ... -- 5056 bytes. left=624, next=0: the next 623
    # outputs are the tempered state words, with no twist in between.
    assert base.size == 5056, f"unknown torch generator state layout ({base.size} bytes)"
    base[8:12] = np.frombuffer(np.int32(624).tobytes(), np.uint8)
    base[16:24] = 0
    per_call = 608  # 38 blocks of 16 < 623
    lanes = per_call // 2
    log_k = np.arange(2**24, dtype=np.uint32)
    sc_k = np.random.default_rng(1).permutation(log_k)  # pair lanes differently
    chunk = lanes * 512
    bad = 0
    for start in range(0, 2**24, chunk):
        kl, kc = log_k[start:start + chunk], sc_k[start:start + chunk]
        pad = (-kl.size) % lanes
        kl = np.concatenate([kl, np.zeros(pad, np.uint32)])
        kc = np.concatenate([kc, np.zeros(pad, np.uint32)])
        blocks = np.empty((kl.size // 8, 16), np.uint32)
        blocks[:, :8] = kl.reshape(-1, 8)
        blocks[:, 8:] = kc.reshape(-1, 8)
        words = _untemper(blocks.reshape(-1)).reshape(-1, per_call)
        ref = np.empty(words.shape, np.float32)
        state = base.copy()
        words64 = state[24:24 + 8 * 624].view(np.uint64)
        for i in range(words.shape[0]):
            words64[:per_call] = words[i]
            g.set_state(torch.from_numpy(state))
            ref[i] = torch.randn(per_call, generator=g, dtype=torch.float32).numpy()
        u = (blocks & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
        got = rng._box_muller_16(u).reshape(ref.shape)
        bad += int((got.view(np.uint32) != ref.view(np.uint32)).sum())
    print(f"all 2**24 uniforms in log and sincos lanes: {bad} outputs differ in bits")
    return 0 if bad == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "rng"))
    ap.add_argument("--check", action="store_true",
                    help="compare cpuflow.rng with torch instead of writing goldens")
    ap.add_argument("--exhaustive", action="store_true",
                    help="check the Box-Muller emulation on all 2**24 uniforms")
    args = ap.parse_args()

    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or cap not in ("AVX2", "AVX512"):
        print(f"refusing: torch runs its {cap} kernels on {platform.machine()}; the goldens "
              "must come from the AVX2/AVX512 normal kernel", file=sys.stderr)
        return 2

    def torch_seq(seed, shapes):
        g = torch.Generator("cpu").manual_seed(seed)
        return [torch.randn(tuple(s), generator=g, dtype=torch.float32).numpy()
                for s in shapes]

    def torch_batch():
        gens = [torch.Generator("cpu").manual_seed(s) for s in BATCH_SEEDS]
        try:
            from diffusers.utils.torch_utils import randn_tensor
        except Exception:
            per = (1,) + BATCH_SHAPE[1:]
            return torch.cat([torch.randn(per, generator=g, dtype=torch.float32)
                              for g in gens]).numpy()
        return randn_tensor(BATCH_SHAPE, generator=gens, dtype=torch.float32).numpy()

    if args.exhaustive:
        return exhaustive(torch)

    cases = case_list()
    if args.check:
        sys.path.insert(0, str(ROOT))
        from cpuflow.rng import TorchCompatGenerator

        worst = 0.0
        bad = 0
        for case in cases:
            ours = TorchCompatGenerator(case["seed"])
            for shape, ref in zip(case["shapes"], torch_seq(case["seed"], case["shapes"])):
                got = ours.randn(tuple(shape))
                diff = float(np.abs(got - ref).max()) if ref.size else 0.0
                worst = max(worst, diff)
                bad += int((got.view(np.uint32) != ref.view(np.uint32)).sum())
        per = (1,) + BATCH_SHAPE[1:]  # one generator per image, as the pipelines draw a batch
        got = np.concatenate([TorchCompatGenerator(s).randn(per) for s in BATCH_SEEDS])
        ref = torch_batch()
        bad += int((got.view(np.uint32) != ref.view(np.uint32)).sum())
        worst = max(worst, float(np.abs(got - ref).max()))
        print(f"{len(cases) + 1} cases: {bad} values differ in bits, max abs diff {worst:g}")
        return 0 if bad == 0 else 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "generated_by": "scripts/regen_rng_golden.py",
        "torch": torch.__version__,
        "cpu_capability": cap,
        "numpy": np.__version__,
        "edge": EDGE,
        "stride": STRIDE,
        "cases": [],
    }
    for case in cases:
        calls = []
        for j, arr in enumerate(torch_seq(case["seed"], case["shapes"])):
            calls.append(summarize(f"{case['name']}/{j}/", arr, arrays))
        meta["cases"].append({**case, "calls": calls})
    batch = torch_batch()
    meta["batch"] = {"name": "batch", "seeds": BATCH_SEEDS, "shape": list(BATCH_SHAPE),
                     "call": summarize("batch/0/", batch, arrays)}

    np.savez_compressed(out / "golden.npz", **arrays)
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (out / "golden.npz").stat().st_size + (out / "golden.json").stat().st_size
    print(f"wrote {len(meta['cases'])} cases + batch to {out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
