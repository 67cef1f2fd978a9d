"""The step-time model: roofline compute, one host link, overlap of copies with compute."""
import numpy as np
import pytest

from sim.costmodel import CostModel
from sim.hardware import get_hardware
from sim.models import get_model
from sim.policies.base import StepPlan

M = get_model("mixtral-8x7b")
HW = get_hardware("a100-80gb")
L = M.n_moe_layers


def plan(demand=None, early=None, lead=0, ahead=0):
    counts = np.zeros((L, M.n_experts), dtype=np.int64)
    counts[:, :2] = 1
    z = np.zeros(L, dtype=np.int64)
    return StepPlan(counts, z if demand is None else demand, z.copy() if early is None else early, lead, ahead, 0)


def step(cm, p, t0=0.0):
    return cm.step(t0, p, n_tokens=1, n_sampled=1, attn_ctx=100, kv_tokens=100)


def test_no_copies_is_the_sum_of_compute():
    cm = CostModel(M, HW)
    p = plan()
    s = step(cm, p)
    expect = cm.fixed_s(1, 1) + L * cm.attention_s(1, 100, 100) + cm.experts_s(p.counts, 1).sum()
    assert s.duration_s == pytest.approx(expect)
    # Decode of one token is memory bound: reading two experts per layer dominates.
    assert cm.experts_s(p.counts, 1)[0] == pytest.approx(2 * M.bytes_per_expert / HW.hbm)


def test_demand_copies_serialise_on_the_link():
    cm = CostModel(M, HW)
    base = step(cm, plan()).duration_s
    d = np.zeros(L, dtype=np.int64)
    d[5] = 2
    cm2 = CostModel(M, HW)
    s = step(cm2, plan(demand=d))
    # The layer waits for two copies in a row (its own compute overlaps nothing).
    assert s.duration_s == pytest.approx(base + 2 * cm.copy_s, rel=1e-6)
    assert s.link_busy_s == pytest.approx(2 * cm.copy_s) and s.stall_s == pytest.approx(2 * cm.copy_s)


def test_prefetch_one_layer_ahead_hides_part_of_the_copy():
    ones = np.ones(L, dtype=np.int64)
    demand = step(CostModel(M, HW), plan(demand=ones)).duration_s
    early = step(CostModel(M, HW), plan(early=ones, lead=1)).duration_s
    base = step(CostModel(M, HW), plan()).duration_s
    assert base < early < demand
    # Copies dominate (a copy is far longer than a layer), so the link bounds the step.
    assert early >= L * CostModel(M, HW).copy_s


def test_link_backlog_carries_to_the_next_step():
    cm = CostModel(M, HW)
    s1 = step(cm, plan(ahead=20))          # prefetch for later steps: nobody waits this step
    assert s1.stall_s == 0
    assert cm.link_free_at == pytest.approx(20 * cm.copy_s)
    d = np.zeros(L, dtype=np.int64)
    d[0] = 1
    s2 = step(cm, plan(demand=d), t0=s1.duration_s)   # demand queues behind the in-flight backlog
    assert s2.stall_s > 0


def test_more_gpus_more_links():
    hw4 = get_hardware({"preset": "a100-80gb", "count": 4})
    assert CostModel(M, hw4).copy_s < CostModel(M, HW).copy_s / 3


@pytest.mark.parametrize("backlog", [0.0, 0.05, 1.0])
def test_closed_form_demand_step_equals_the_layer_walk(backlog):
    rng = np.random.default_rng(0)
    d = rng.integers(0, 3, L)
    d[:3] = 0
    a, b = CostModel(M, HW), CostModel(M, HW)
    a.link_free_at = b.link_free_at = backlog
    p = plan(demand=d)
    fast = step(a, p)
    attn = b.attention_s(1, 100, 100)
    walk = b._step_with_copies(0.0, p, attn, b.experts_s(p.counts, 1), b.fixed_s(1, 1))
    assert fast.duration_s == pytest.approx(walk.duration_s)
    assert fast.stall_s == pytest.approx(walk.stall_s)
    assert a.link_free_at == pytest.approx(b.link_free_at)


def test_one_layer_ahead_prefetch_overlaps_the_previous_layer():
    """A copy issued one layer early overlaps that layer's compute: with copies shorter
    than a layer, prefetching every layer hides them all."""
    slow = get_hardware({"preset": "a100-80gb", "h2d_bytes_per_s": 1e15, "h2d_latency_s": 1e-4})
    ones = np.ones(L, dtype=np.int64)
    base = step(CostModel(M, slow), plan()).duration_s
    early = step(CostModel(M, slow), plan(early=ones, lead=1))
    # Only layer 0's copy (issued at step start, with nothing before it) can stall.
    assert early.stall_s <= CostModel(M, slow).copy_s + 1e-9
    assert early.duration_s <= base + CostModel(M, slow).copy_s + 1e-9
