"""eMoE's headline behaviour on the shipped Mixtral-shape trace (issue 4's acceptance)."""
from pathlib import Path

import pytest

from sim.run import run_scenario
from sim.scenario import load_scenario

BASE = Path(__file__).parent.parent / "scenarios" / "paper" / "base-mixtral.yaml"


@pytest.fixture(scope="module")
def runs():
    common = [("workload.requests", 120), ("workload.arrival.rate", 0.5)]
    out = {}
    for name, policy in [("resident", {"name": "resident"}), ("emoe", {"name": "emoe", "capacity": 0.4}),
                         ("random", {"name": "random", "capacity": 0.4})]:
        out[name] = run_scenario(load_scenario(BASE, common + [("policy", policy)])).summary
    return out


def test_expert_memory_at_most_45_percent_of_resident(runs):
    assert runs["emoe"]["peak_experts_bytes"] <= 0.45 * runs["resident"]["peak_experts_bytes"]


def test_latency_within_10_percent_of_resident(runs):
    assert runs["emoe"]["e2e_mean_s"] <= 1.10 * runs["resident"]["e2e_mean_s"]
    assert runs["emoe"]["requests_completed"] == runs["resident"]["requests_completed"] == 120


def test_fidelity_beats_random_at_the_same_budget(runs):
    assert runs["emoe"]["peak_experts_bytes"] <= runs["random"]["peak_experts_bytes"] * 1.05
    assert runs["emoe"]["routing_fidelity"] > runs["random"]["routing_fidelity"] + 0.05
