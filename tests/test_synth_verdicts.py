"""Decision-level check of the fitted generator, reduced (the full one:
benchmarks/check_generator_verdicts.py): fitted on half of the small MoE's captured
requests, synthetic routing at the other half's shape must give the policies the hit
rates the held-out real routing gives them."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from check_generator_verdicts import POLICIES, simulate, split_halves

from traces.fit import fit_profile
from traces.format import load_trace, save_trace
from traces.synth import synthesize


@pytest.fixture(scope="module")
def held_and_synthetic(tmp_path_factory):
    real = load_trace(ROOT / "traces" / "samples" / "emoe-small-moe-captured.npz")
    train_idx, held_idx = split_halves(real)
    assert not set(train_idx) & set(held_idx) and len(train_idx) + len(held_idx) == real.n_requests
    train, held = real.subset(train_idx), real.subset(held_idx)
    prof = fit_profile(train, rounds=10, seed=0)
    d = tmp_path_factory.mktemp("verdicts")
    syn = synthesize(None, None, None, seed=100, profile=prof, like=held)
    return save_trace(held, d / "held.npz"), save_trace(syn, d / "syn.npz")


@pytest.mark.parametrize("policy", ["on_demand LRU", "oracle"])
def test_hit_rates_within_three_points(held_and_synthetic, policy):
    held, syn = held_and_synthetic
    real = simulate(held, POLICIES[policy], 0.5, 20.0, 0)["hit_rate"]
    synthetic = simulate(syn, POLICIES[policy], 0.5, 20.0, 0)["hit_rate"]
    assert abs(synthetic - real) <= 0.03, f"{policy}: real {real:.3f}, synthetic {synthetic:.3f}"


def test_oracle_beats_lru_on_both(held_and_synthetic):
    for path in held_and_synthetic:
        lru = simulate(path, POLICIES["on_demand LRU"], 0.5, 20.0, 0)["hit_rate"]
        oracle = simulate(path, POLICIES["oracle"], 0.5, 20.0, 0)["hit_rate"]
        assert oracle > lru
