"""Policy decisions on hand-made batches."""
import numpy as np
import pytest

from traces.model_shape import get_model
from sim.params import ParamError
from sim.policies import POLICIES, StepBatch, make_policy
from sim.request import Request

TINY = get_model("tiny")   # 4 layers, 8 experts, top-2


def batch(experts, probs=None, step=0):
    ex = np.asarray(experts, dtype=np.uint8)
    n = len(ex)
    r = Request(index=0, rid="r0", task="qa", prompt_tokens=4, output_tokens=4, row0=0, arrival_s=0.0, slo={},
                expected_output=4.0)
    g = np.full(ex.shape, 0.5, dtype=np.float16)
    return StepBatch(step=step, experts=ex, gates=g, probs=probs, token_req=np.zeros(n, dtype=np.int64),
                     requests=[r])


def test_reroute_goes_to_next_ranked_resident_expert():
    p = make_policy({"name": "random", "capacity": 0.5}, TINY, seed=0)
    p.resident[:] = False
    p.resident[:, [0, 1, 2, 3]] = True
    probs = np.zeros((1, 4, 8), dtype=np.float16)
    probs[0, :, :] = [0.01, 0.02, 0.3, 0.07, 0.4, 0.1, 0.05, 0.05]
    # Token wants experts 4 (absent) and 0 (resident): 4 -> best resident not chosen = 2.
    ex = np.tile([[4, 0]], (4, 1))[None]
    new, hit, rerouted = p.rerouter.reroute(batch(ex, probs))
    assert new[0, 0].tolist() == [2, 0] and rerouted.all()
    assert hit[0, 0].tolist() == [False, True]
    plan = p.plan_step(batch(ex, probs))
    assert plan.counts[0, 2] == 1 and plan.counts[0, 4] == 0
    assert p.counters()["routing_fidelity"] == pytest.approx(0.5, abs=1e-3)


def test_reroute_without_probs_uses_popularity():
    p = make_policy({"name": "random", "capacity": 0.5}, TINY, seed=0)
    p.resident[:] = False
    p.resident[:, [0, 1, 2, 3]] = True
    p.rerouter.popularity[:] = 1
    p.rerouter.popularity[:, 3] = 50
    new, _, _ = p.rerouter.reroute(batch(np.tile([[7, 6]], (4, 1))[None]))
    assert sorted(new[0, 0].tolist()) == [2, 3] or new[0, 0, 0] == 3


def test_lru_evicts_the_least_recently_used():
    p = make_policy({"name": "on_demand", "capacity": 0.25}, TINY)   # 2 experts per layer
    assert p.resident[0].tolist() == [True, True] + [False] * 6
    p.plan_step(batch(np.tile([[0, 2]], (4, 1))[None]))   # 2 misses: evicts 1 (unused)
    assert set(np.flatnonzero(p.resident[0])) == {0, 2}
    p.plan_step(batch(np.tile([[2, 3]], (4, 1))[None]))   # 3 missing: 0 is least recent
    assert set(np.flatnonzero(p.resident[0])) == {2, 3}
    c = p.counters()
    assert c["misses"] == 2 * 4 and c["hits"] == (2 + 2) * 4 - 8


@pytest.mark.parametrize("eviction,kept", [("lru", {0, 2, 3}), ("lfu", {0, 1, 3})])
def test_lru_and_lfu_differ_on_frequent_but_old(eviction, kept):
    p = make_policy({"name": "on_demand", "capacity": 0.375, "eviction": eviction}, TINY)  # 3 per layer
    for pair in [[1, 0]] * 3 + [[0, 2]]:      # 1: used 3x, long ago; 2: used once, just now
        p.plan_step(batch(np.tile([pair], (4, 1))[None]))
    p.plan_step(batch(np.tile([[0, 3]], (4, 1))[None]))
    assert set(np.flatnonzero(p.resident[0])) == kept


def test_random_subset_is_fixed_and_sized():
    p = make_policy({"name": "random", "capacity": 0.5}, TINY, seed=3)
    before = p.resident.copy()
    assert (before.sum(axis=1) == 4).all()
    p.plan_step(batch(np.tile([[0, 7]], (4, 1))[None]))
    assert (p.resident == before).all()
    q = make_policy({"name": "random", "capacity": 0.5}, TINY, seed=4)
    assert not (q.resident == before).all()


def test_capacity_below_top_k_is_rejected():
    with pytest.raises(ValueError, match="below top_k=2"):
        make_policy({"name": "on_demand", "capacity": 0.1}, TINY)


def test_every_policy_is_registered_and_checks_params():
    assert set(POLICIES) >= {"resident", "on_demand", "random", "pregated", "moe_infinity", "oracle"}
    for cls in POLICIES.values():
        with pytest.raises(ParamError, match=r"unknown parameter\(s\) \['no_such_knob'\]; allowed: "):
            cls.Params.of({"no_such_knob": 1})


# ---- baselines' prefetch, each after its own paper -------------------------------------------
def _step(experts, probs=None, step=0, req=None):
    ex = np.asarray(experts, dtype=np.uint8)
    r = req or Request(index=0, rid="r0", task="qa", prompt_tokens=4, output_tokens=64, row0=0, arrival_s=0.0,
                       slo={}, expected_output=4.0)
    g = np.full(ex.shape, 0.5, dtype=np.float16)
    return StepBatch(step=step, experts=ex, gates=g, probs=probs, token_req=np.zeros(len(ex), dtype=np.int64),
                     requests=[r])


def test_pregated_learns_the_next_layers_experts_and_prefetches_them_after_the_router():
    """Two routings alternate, with disjoint experts at every layer (so every step misses
    everything in a cache of 2 per layer): once the transitions are learnt, layer l's gate
    predicts exactly layer l+1's experts, copied once layer l's router has run."""
    from sim.policies.base import after_router
    p = make_policy({"name": "pregated", "capacity": 0.25}, TINY)        # 2 experts per layer
    a = [[0, 1], [2, 3], [4, 5], [6, 7]]
    b = [[4, 5], [6, 7], [0, 1], [2, 3]]
    for t in range(10):
        p.plan_step(_step([a if t % 2 else b], step=t))
    before = p.accounting.ahead_loads
    plan = p.plan_step(_step([b], step=10))          # the last step was a: nothing of b is cached
    got = [(at, layer, e) for at, layer, e in plan.prefetch]
    assert got == [(after_router(layer - 1), layer, e) for layer in (1, 2, 3) for e in b[layer]]
    assert plan.demand.tolist() == [2, 0, 0, 0]      # layer 0 has no earlier gate: on demand
    assert p.accounting.ahead_loads == before                    # no wrong guess


@pytest.mark.parametrize("recall,predicted", [(1.0, True), (0.0, False)])
def test_pregated_recall_is_a_pre_gate_of_that_quality(recall, predicted):
    p = make_policy({"name": "pregated", "capacity": 0.25, "recall": recall}, TINY)
    plan = p.plan_step(_step(np.tile([[4, 5]], (4, 1))[None]))
    assert bool(plan.prefetch) == predicted
    assert plan.demand[0] == 2 and plan.demand[1:].sum() == (0 if predicted else 6)
    assert p.accounting.ahead_loads == 0


def test_moe_infinity_prefetches_the_matched_requests_experts_nearest_layer_first():
    from sim.policies.base import STEP_START
    p = make_policy({"name": "moe_infinity", "capacity": 0.25}, TINY)
    done = Request(index=9, rid="r9", task="qa", prompt_tokens=4, output_tokens=4, row0=0, arrival_s=0.0,
                   slo={}, expected_output=4.0)
    p.on_admit(done, 0.0)
    p.plan_step(_step(np.tile([[6, 7]], (4, 1))[None], req=done))
    p.on_finish(done, 1.0)                            # the library holds one request: experts 6, 7
    r = Request(index=0, rid="r0", task="qa", prompt_tokens=4, output_tokens=64, row0=0, arrival_s=0.0, slo={},
                expected_output=4.0)
    p.on_admit(r, 1.0)
    first = p.plan_step(_step(np.tile([[6, 7]], (4, 1))[None], req=r))
    assert first.prefetch == ()                       # nothing known of r yet: no peeking at its routing
    p.resident[:] = False
    p.resident[:, :2] = True
    plan = p.plan_step(_step(np.tile([[6, 7]], (4, 1))[None], step=1, req=r))
    assert [(at, layer) for at, layer, _ in plan.prefetch] == [(STEP_START, layer) for layer in range(4)
                                                              for _ in range(2)]
    assert {e for _, _, e in plan.prefetch} == {6, 7}
    assert not plan.demand.any()


@pytest.mark.parametrize("name", ["on_demand", "pregated", "moe_infinity", "random"])
def test_a_step_with_prompt_chunks_counts_hits_per_request_as_route_by_route(name):
    """A step with prompt chunks counts its routes per (request, layer, expert) once and takes
    each request's hits from that table (_needed_by_request); route by route (the table
    refused) must give the same plan, cache and counters, request by request."""
    rng = np.random.default_rng(3)
    spec = {"name": name, "capacity": 0.5} if name != "moe_infinity" else {"name": name}
    fast, slow = make_policy(spec, TINY, seed=1), make_policy(spec, TINY, seed=1)
    slow._needed_by_request = lambda batch, flat: None
    reqs = {p: [Request(index=i, rid=f"r{i}", task=["qa", "code", "math"][i % 3], prompt_tokens=64,
                        output_tokens=8, row0=0, arrival_s=0.0, slo={}, expected_output=8.0)
                for i in range(6)] for p in (fast, slow)}
    taken = 0
    for step in range(40):
        n_dec = int(rng.integers(0, 5))
        chunks = rng.integers(1, 40, size=int(rng.integers(1, 3)))        # one or two prompt chunks
        token_req = np.concatenate([np.arange(n_dec)] + [np.full(c, n_dec + i) for i, c in enumerate(chunks)])
        n = len(token_req)
        ex = np.stack([rng.choice(8, size=(4, 2), replace=False, p=np.r_[[0.3, 0.2], [0.5 / 6] * 6])
                       for _ in range(n)]).astype(np.uint8)
        g = np.full(ex.shape, 0.5, dtype=np.float16)
        plans = []
        for p in (fast, slow):
            rs = reqs[p][: n_dec + len(chunks)]
            b = StepBatch(step=step, experts=ex, gates=g, probs=None, token_req=token_req, requests=rs)
            taken += p is fast and p._needed_by_request(b, p._flat_routes(ex)) is not None
            plans.append(p.plan_step(b))
        assert (plans[0].counts == plans[1].counts).all() and (plans[0].demand == plans[1].demand).all()
        assert (fast.resident == slow.resident).all()
    assert taken > 20                                                   # the table was used
    assert fast.counters() == slow.counters()
    for a, b in zip(reqs[fast], reqs[slow]):
        assert (a.hits, a.misses, a.routes, a.gate_kept) == (b.hits, b.misses, b.routes, b.gate_kept)
