"""The step-time model: roofline compute, one host link, overlap of copies with compute."""
import numpy as np
import pytest

from sim.costmodel import CostModel
from sim.hardware import get_hardware
from traces.model_shape import get_model
from sim.policies.base import STEP_START, StepPlan, after_router, as_layer_starts

M = get_model("mixtral-8x7b")
HW = get_hardware("a100-80gb")
L = M.n_moe_layers


def plan(demand=None, prefetch=(), counts=None):
    if counts is None:
        counts = np.zeros((L, M.n_experts), dtype=np.int64)
        counts[:, :2] = 1
    z = np.zeros(L, dtype=np.int64)
    return StepPlan(counts=counts, demand=z if demand is None else demand, prefetch=list(prefetch), staged=0)


def one_layer_ahead(layers, expert=0):
    """Prefetch `expert` of each layer as the layer before starts (layer 0's at its own start)."""
    return [(as_layer_starts(max(layer - 1, 0)), layer, expert) for layer in layers]


def for_later(n):
    """n prefetch copies at step start of experts the step does not use (counts use 0 and 1)."""
    return [(STEP_START, i % L, 2 + i // L) for i in range(n)]


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
    early = step(CostModel(M, HW), plan(prefetch=one_layer_ahead(range(L)))).duration_s
    base = step(CostModel(M, HW), plan()).duration_s
    assert base < early < demand
    # Copies dominate (a copy is far longer than a layer), so the link bounds the step.
    assert early >= L * CostModel(M, HW).copy_s


def test_link_backlog_carries_to_the_next_step():
    cm = CostModel(M, HW)
    s1 = step(cm, plan(prefetch=for_later(20)))   # prefetch for later steps: nobody waits this step
    assert s1.stall_s == 0
    assert not cm.link_idle(s1.duration_s)        # the copies go on after the step
    d = np.zeros(L, dtype=np.int64)
    d[0] = 1
    s2 = step(cm, plan(demand=d), t0=s1.duration_s)   # demand queues behind the copy in flight
    assert s2.stall_s > cm.copy_s


@pytest.mark.parametrize("n", [1, 8, 40])
def test_a_demand_copy_waits_for_the_copy_in_flight_not_for_queued_prefetches(n):
    """One demand copy behind n queued prefetches (issued at step start, for later steps)
    waits for its own copy plus at most the one in flight, whatever n."""
    d = np.zeros(L, dtype=np.int64)
    d[3] = 1
    alone = step(CostModel(M, HW), plan(demand=d))
    cm = CostModel(M, HW)
    behind = step(cm, plan(demand=d, prefetch=for_later(n)))
    c = cm.copy_s
    assert alone.stall_s == pytest.approx(c)
    assert c < behind.stall_s <= 2 * c + 1e-12
    assert behind.duration_s - alone.duration_s <= c + 1e-12
    # The link never idles: n + 1 copies back to back from t0 (the queue drains after the step).
    assert cm.link_free_at + len(cm.queued) * c == pytest.approx((n + 1) * c)


def test_a_layer_waits_for_a_prefetch_of_an_earlier_step_still_in_flight():
    """Prefetches for later steps: a later step that uses one before it lands waits for it;
    one still queued when a layer needs it is promoted ahead of the other queued copies."""
    cm = CostModel(M, HW)
    c = cm.copy_s
    counts = np.zeros((L, M.n_experts), dtype=np.int64)
    counts[:, :2] = 1
    first = step(cm, plan(prefetch=[(STEP_START, 0, 5), (STEP_START, 1, 5)] + for_later(30)))
    assert first.stall_s == 0
    use = counts.copy()
    use[0, 5] = use[1, 5] = 1                  # the next step uses the first two prefetched experts
    nxt = step(cm, plan(counts=use), t0=first.duration_s)
    # (0, 5) and (1, 5) started first, so they have landed or are in flight: the step waits
    # no longer than their remaining copy time, not for the 30 queued behind them.
    assert 0 < nxt.stall_s <= 2 * c - first.duration_s + 1e-12
    cm2 = CostModel(M, HW)
    step(cm2, plan(prefetch=for_later(30) + [(STEP_START, 0, 5)]))
    late = step(cm2, plan(counts=use), t0=first.duration_s)
    # (0, 5) is 31st in the queue: promoted to demand, it waits for the copy in flight and its own.
    assert c < late.stall_s <= 2 * c + 1e-12


def test_prefetch_issue_points_are_respected():
    """A copy issued after layer j's router cannot start before it; one issued at step start can."""
    cm = CostModel(M, HW)
    fixed = cm.fixed_s(1, 1)
    attn = cm.attention_s(1, 100, 100)
    step(cm, plan(prefetch=[(after_router(4), 20, 7)]))
    assert not cm.queued
    start = cm.link_free_at - cm.copy_s
    ffn = cm.experts_s(plan().counts, 1)
    router4 = fixed + 5 * attn + ffn[:4].sum()
    assert start == pytest.approx(router4)
    cm = CostModel(M, HW)
    step(cm, plan(prefetch=[(STEP_START, 20, 7)]))
    assert cm.link_free_at == pytest.approx(cm.copy_s)


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
    base = step(CostModel(M, slow), plan()).duration_s
    early = step(CostModel(M, slow), plan(prefetch=one_layer_ahead(range(L))))
    # Only layer 0's copy (issued at step start, with nothing before it) can stall.
    assert early.stall_s <= CostModel(M, slow).copy_s + 1e-9
    assert early.duration_s <= base + CostModel(M, slow).copy_s + 1e-9


def test_emoe_swap_ins_delay_the_layers_that_use_them():
    """An eMoE invocation swaps in the experts its step uses: each layer waits until its own
    swap-ins land (issued once the prediction is done, as layer 0 starts, nearest layer
    first), which the cost model used to ignore (the copies went out as prefetches nobody
    waited for). Same routing with the experts already resident: no copy, no wait."""
    from sim.policies import make_policy
    from sim.policies.base import StepBatch
    from sim.request import Request
    from simhelpers import TINY_HW
    tiny, hw = get_model("tiny"), get_hardware(TINY_HW)
    pol = make_policy({"name": "emoe", "capacity": 0.25, "skip": False, "interval": 1, "invoke_s": 0.0},
                      tiny, None, 0)
    pol.predictor.prior = {"qa": np.tile([0, 0, 0.5, 0.4, 0.1, 0, 0, 0], (tiny.n_moe_layers, 1))}
    pol.warm = True                       # as if a request had finished: the predictor knows qa
    req = Request(index=0, rid="r0", task="qa", prompt_tokens=1, output_tokens=4, row0=0, arrival_s=0.0, slo={},
                  expected_output=4.0)
    pol.on_arrival(req, 0.0)
    Lt = tiny.n_moe_layers
    ex = np.tile([[2, 3]], (Lt, 1))[None].astype(np.uint8)          # one token, experts 2 and 3 everywhere
    batch = StepBatch(step=0, experts=ex, gates=np.full(ex.shape, 0.5, dtype=np.float32), probs=None,
                      token_req=np.zeros(1, dtype=np.int64), requests=[req])
    assert set(np.flatnonzero(pol.resident[0])) == {0, 1}
    plan = pol.plan_step(batch)
    assert [(layer, e) for _, layer, e in plan.prefetch] == [(layer, e) for layer in range(Lt) for e in (2, 3)]
    assert {at for at, _, _ in plan.prefetch} == {as_layer_starts(0)}
    assert not plan.demand.any() and pol.accounting.misses == 2 * Lt and pol.accounting.ahead_loads == 0
    cm = CostModel(tiny, hw)
    s = cm.step(0.0, plan, 1, 1, 1, 1)
    fixed, attn, c = cm.fixed_s(1, 1), cm.attention_s(1, 1, 1), cm.copy_s
    ffn = cm.experts_s(plan.counts, 1)
    assert c > attn + ffn.max()           # copies dominate: each layer waits for its last swap-in
    # Layer l's experts land at layer 0's start + 2(l + 1) copies; it waits from its router on.
    ready = fixed + 2 * c * np.arange(1, Lt + 1)
    router = np.concatenate([[fixed], ready[:-1] + ffn[:-1]]) + attn
    assert s.stall_s == pytest.approx((ready - router).sum())
    assert s.duration_s == pytest.approx(fixed + 2 * Lt * c + ffn[-1])
    no_copies = CostModel(tiny, hw).step(0.0, StepPlan(counts=plan.counts, demand=plan.demand, prefetch=[], staged=0),
                                         1, 1, 1, 1)
    assert no_copies.stall_s == 0
    assert s.duration_s - no_copies.duration_s == pytest.approx(s.stall_s)


def _streamed_plan(n, active=4):
    """Layer 0 uses `active` experts, `n` of them streamed (the cache is full): n demand copies."""
    counts = np.zeros((L, M.n_experts), dtype=np.int64)
    counts[:, :2] = 1
    counts[0, :active] = 1
    d = np.zeros(L, dtype=np.int64)
    d[0] = n
    streamed = np.zeros(L, dtype=np.int64)
    streamed[0] = n
    return StepPlan(counts=counts, demand=d, prefetch=[], staged=n, streamed=streamed)


def test_streamed_experts_compute_as_they_land():
    """Copies far longer than compute (a GPU): the layer's cached experts compute while the
    streamed ones copy, each streamed one as it lands, so the layer ends one expert's compute
    after its last copy (not after all copies plus the whole layer)."""
    cm = CostModel(M, HW)
    p = _streamed_plan(3)
    s = cm.step(0.0, p, 1, 1, 100, 100)
    c, fixed, attn = cm.copy_s, cm.fixed_s(1, 1), cm.attention_s(1, 100, 100)
    ffn = cm.experts_s(p.counts, 1)
    router0 = fixed + attn
    end0 = router0 + 3 * c + ffn[0] / 4            # the last streamed expert computes after its copy
    assert s.duration_s == pytest.approx(end0 + (L - 1) * attn + ffn[1:].sum())
    assert s.stall_s == pytest.approx(3 * c + ffn[0] / 4 - ffn[0])   # its cached experts computed meanwhile
    assert cm.link_free_at == pytest.approx(router0 + 3 * c)


def test_streamed_copies_wait_for_a_free_staging_slot():
    """Copies far shorter than compute: only top_k staging slots, so copy j + top_k starts once
    streamed expert j has computed; the link is not free until the last streamed copy."""
    fast = get_hardware({"preset": "a100-80gb", "h2d_bytes_per_s": 1e15, "h2d_latency_s": 1e-6})
    slow_compute = get_hardware({"preset": "a100-80gb", "h2d_bytes_per_s": 1e15, "h2d_latency_s": 1e-6,
                                 "hbm_bytes_per_s": 1e10})
    for hw in (fast, slow_compute):
        cm = CostModel(M, hw)
        p = _streamed_plan(4, active=4)
        cm.step(0.0, p, 1, 1, 100, 100)
        c, k = cm.copy_s, M.top_k
        each = cm.experts_s(p.counts, 1)[0] / 4
        router0 = cm.fixed_s(1, 1) + cm.attention_s(1, 100, 100)
        # copies 0, 1 at once; 2 waits for expert 0 (done at router0 + c + each), 3 for expert 1.
        t = router0
        link, freed = router0, []
        for j in range(4):
            start = link if j < k else max(link, freed[j - k])
            link = start + c
            t = max(t, link) + each
            freed.append(t)
        assert cm.link_free_at == pytest.approx(link)
        assert (link > router0 + 4 * c + 1e-12) == (each > c)     # slots bind only when compute is slower


@pytest.mark.parametrize("backlog", [0.0, 0.02])
@pytest.mark.parametrize("hw", [HW, get_hardware({"preset": "a100-80gb", "hbm_bytes_per_s": 2e10})])
def test_closed_form_streamed_step_equals_the_layer_walk(backlog, hw):
    """Demand copies with streamed experts: the closed form (when no staging slot binds) and
    the copy-by-copy walk give the same step; where slots bind, only the walk applies."""
    rng = np.random.default_rng(1)
    counts = np.zeros((L, M.n_experts), dtype=np.int64)
    counts[:, :6] = rng.integers(1, 4, (L, 6))
    d = rng.integers(0, 4, L)
    st = np.minimum(d, rng.integers(0, 3, L))
    p = StepPlan(counts=counts, demand=d, prefetch=[], staged=int(st.sum()), streamed=st)
    a, b = CostModel(M, hw), CostModel(M, hw)
    a.link_free_at = b.link_free_at = backlog
    fast = a.step(0.0, p, 6, 1, 100, 100)
    b._busy = 0.0
    walk = b._step_with_copies(0.0, p, b.attention_s(6, 100, 100), b.experts_s(counts, 6), b.fixed_s(6, 1))
    closed = a._streamed_closed_form(p, a.experts_s(counts, 6)) is not None
    assert closed == (hw is HW)          # slow compute (2e10 B/s HBM): staging slots bind
    assert fast.duration_s == pytest.approx(walk.duration_s)
    assert fast.stall_s == pytest.approx(walk.stall_s)
    assert fast.link_busy_s == pytest.approx(walk.link_busy_s)
    assert a.link_free_at == pytest.approx(b.link_free_at)


@pytest.mark.parametrize("hbm", [2e11, 1.5e11])
def test_a_copy_in_flight_at_the_step_start_delays_streamed_copies_not_cached_experts(hbm):
    """Layer 0's only demand copy streams while a copy from the last step is still on the link,
    and its expert compute is longer than one copy: the cached experts compute during the
    backlog, so the step equals the copy-by-copy walk (the closed form would add the backlog
    to the whole layer)."""
    M8 = get_model("mixtral-8x7b")
    L8 = M8.n_moe_layers
    counts = np.zeros((L8, M8.n_experts), dtype=np.int64)
    counts[:, :8] = 3
    d = np.zeros(L8, dtype=np.int64)
    d[0] = 1
    p = StepPlan(counts=counts, demand=d, prefetch=[], staged=1, streamed=d.copy())
    hw = get_hardware({"preset": "a100-80gb", "hbm_bytes_per_s": hbm})
    a, b = CostModel(M8, hw), CostModel(M8, hw)
    a.link_free_at = b.link_free_at = 0.01
    assert a.experts_s(counts, 6)[0] > a.copy_s       # compute outlasts a copy: the case that differs
    fast = a.step(0.0, p, 6, 1, 100, 100)
    b._busy = 0.0
    walk = b._step_with_copies(0.0, p, b.attention_s(6, 100, 100), b.experts_s(counts, 6), b.fixed_s(6, 1))
    assert fast.duration_s == pytest.approx(walk.duration_s, rel=1e-12)
    assert fast.stall_s == pytest.approx(walk.stall_s, abs=1e-12)


def _measured(**attention):
    shape = {k: getattr(M, k) for k in ("hidden", "expert_ffn", "n_moe_layers", "n_experts", "top_k", "n_heads",
                                        "n_kv_heads", "n_shared_experts")}
    return {"model": shape, "attention_s": {"a": 1e-4, "b": 1e-6, "c": 1e-8, "d": 5e-5, **attention},
            "expert_s": {"a": 2e-4, "b": 1e-6, "layer": 0.0}, "step_s": {"a": 1e-3, "b": 0.0, "c": 0.0}}


def test_a_profiles_prefill_context_term_prices_prompt_chunks_only():
    from dataclasses import replace
    old = CostModel(M, replace(HW, measured=_measured()))          # a profile from before the term
    new = CostModel(M, replace(HW, measured=_measured(e=2e-8)))
    # Without the term (older profiles, datasheet presets) prompt-chunk context costs what it did.
    assert old.attention_s(300, 5e4, 300, 2, prefill_ctx=4e4) == old.attention_s(300, 5e4, 300, 2)
    assert new.attention_s(300, 5e4, 300, 2, prefill_ctx=4e4) == pytest.approx(
        old.attention_s(300, 5e4, 300, 2) + 2e-8 * 4e4)
    assert new.attention_s(8, 4e3, 4e3, 8) == old.attention_s(8, 4e3, 4e3, 8)     # decode: unchanged
    p = plan()
    a = old.step(0.0, p, 300, 1, 5e4, 300, 2, prefill_ctx=4e4).duration_s
    b = new.step(0.0, p, 300, 1, 5e4, 300, 2, prefill_ctx=4e4).duration_s
    assert b - a == pytest.approx(L * 2e-8 * 4e4)
    roofline = CostModel(M, HW)
    assert roofline.attention_s(300, 5e4, 300, 2, prefill_ctx=4e4) == roofline.attention_s(300, 5e4, 300, 2)


@pytest.mark.parametrize("h2d", [25e9, 2.5e12])   # copies much longer than a layer; shorter
def test_prefetching_decode_run_equals_stepping(h2d):
    """CostModel.decode_run with run.prefetch (each layer's copies issued as the layer before
    starts, the oracle's decode runs) gives step()'s durations, link busy and stall times,
    copy counts (promoted ones too) and leaves the link where step() does."""
    from types import SimpleNamespace
    hw = get_hardware({"preset": "a100-80gb", "h2d_bytes_per_s": h2d})
    rng = np.random.default_rng(3)
    T, E, k = 40, M.n_experts, M.top_k
    counts = np.zeros((T, L, E), dtype=np.int64)
    for t in range(T):
        for layer in range(L):
            counts[t, layer, rng.choice(E, k, replace=False)] = 1
    pre = np.minimum(rng.integers(0, 4, (T, L)), k) * (rng.random((T, L)) < 0.4)
    pre[5] = 0                                                  # a step without copies
    pre[6, :] = 0
    pre[6, -1] = 2                                              # only the last layer copies
    contexts = 300 + np.arange(T)
    run = SimpleNamespace(counts=counts, demand=np.zeros((T, L), dtype=np.int64), prefetch=pre)
    fast, slow = CostModel(M, hw), CostModel(M, hw)
    starts, durations, busy, stall = fast.decode_run(2.0, run, contexts)
    now = 2.0
    for t in range(T):
        wanted = [(as_layer_starts(max(layer - 1, 0)), layer, int(e))
                  for layer in range(L) for e in np.flatnonzero(counts[t, layer])[:pre[t, layer]]]
        p = StepPlan(counts=counts[t], demand=np.zeros(L, dtype=np.int64), prefetch=wanted, staged=0)
        tm = slow.step(now, p, n_tokens=1, n_sampled=1, attn_ctx=float(contexts[t] + 1), kv_tokens=contexts[t] + 1)
        assert starts[t] == pytest.approx(now, rel=1e-12)
        assert durations[t] == pytest.approx(tm.duration_s, rel=1e-12)
        assert busy[t] == pytest.approx(tm.link_busy_s, rel=1e-12)
        assert stall[t] == pytest.approx(tm.stall_s, rel=1e-12, abs=1e-15)
        now += tm.duration_s
    assert fast.copies == slow.copies
    assert fast.copies["prefetch"] == pre.sum()
    if h2d < 1e11:
        assert fast.copies["promoted"] > 0 and stall.sum() > 0
    assert fast.link_free_at == pytest.approx(slow.link_free_at, rel=1e-12)
    assert fast.link_idle(now) and slow.link_idle(now)


def test_a_walked_step_takes_the_same_time_late_in_a_day():
    """The layer walk sums on the step's own clock: a step with prefetches and a link backlog
    takes the same time at t = one day as at t = 0 (on the absolute clock, each of its ~100
    sums would round to ~1e-11 s there), and leaves the link the same distance ahead."""
    times = []
    for t0 in (0.0, 86400.0):
        cm = CostModel(M, HW)
        cm.link_free_at = t0 + 2 ** -8                    # a copy still in flight (exact at both clocks)
        counts = np.zeros((L, M.n_experts), dtype=np.int64)
        counts[:, :2] = 1
        d = np.zeros(L, dtype=np.int64)
        d[5] = 1
        tm = step(cm, plan(demand=d, prefetch=one_layer_ahead(range(1, L)) + for_later(6), counts=counts), t0)
        times.append((tm.duration_s, tm.stall_s, tm.link_busy_s, cm.link_free_at - t0, len(cm.queued)))
    (d0, s0, b0, l0, q0), (d1, s1, b1, l1, q1) = times
    assert d1 == pytest.approx(d0, rel=1e-14) and s1 == pytest.approx(s0, rel=1e-13)
    assert b1 == b0 and q1 == q0
    assert l1 == pytest.approx(l0, abs=3e-11)             # (one rounding of a day's clock)
