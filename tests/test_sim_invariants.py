"""Invariants every simulator run must keep, whatever the policy."""
import numpy as np
import pandas as pd
import pytest

from sim.policies import POLICIES
from sim.schedulers import SCHEDULERS
from sim.run import run_scenario
from simhelpers import tiny_scenario
from traces.model_shape import get_model

FETCH_POLICIES = [
    {"name": "on_demand", "capacity": 0.5},
    {"name": "on_demand", "capacity": 0.5, "eviction": "lfu"},
    {"name": "pregated", "capacity": 0.5},
    {"name": "moe_infinity", "capacity": 0.5},
    {"name": "oracle", "capacity": 0.5},
]


def registry_policies() -> list[dict]:
    """Every registered policy at half capacity, and LFU: a policy registered later is covered."""
    specs = [{"name": n, **({"capacity": 0.5} if "capacity" in c.Params.names() else {})} for n, c in POLICIES.items()]
    return specs + [{"name": "on_demand", "capacity": 0.5, "eviction": "lfu"}]


ALL = registry_policies()


@pytest.fixture(scope="module")
def runs(tiny_trace_path):
    out = {}
    for pol in ALL:
        key = pol["name"] + ("-lfu" if pol.get("eviction") == "lfu" else "")
        out[key] = run_scenario(tiny_scenario(tiny_trace_path, pol))
    return out


def test_every_request_completes_exactly_once(runs):
    for name, r in runs.items():
        req = r.requests
        assert req.completed.all(), name
        assert req.request_id.is_unique
        assert r.summary["requests_completed"] == 40


def test_generated_tokens_equal_output_lengths(runs):
    for name, r in runs.items():
        req = r.requests
        assert (req.generated_tokens == req.output_tokens).all(), name
        # Every step's decode tokens add up to the output tokens beyond the first (made by prefill);
        # preempted requests recompute, so the total can only be larger.
        assert r.timeline.decode_tokens.sum() >= (req.output_tokens - 1).sum()


def test_times_are_ordered(runs):
    for name, r in runs.items():
        q = r.requests
        assert (q.admitted_s >= q.arrival_s - 1e-12).all() and (q.first_token_s > q.admitted_s).all()
        assert (q.finish_s >= q.first_token_s).all(), name


def test_resident_bytes_never_exceed_the_budget(runs):
    m = get_model("tiny")
    for name, r in runs.items():
        tl = r.timeline
        assert (tl.mem_experts <= r.summary["peak_experts_bytes"] + 1).all()
        cap = r.summary["budget_bytes"] - r.summary["peak_dense_bytes"]
        assert (tl.mem_experts + tl.mem_kv <= cap + 1).all(), name
        if name != "resident":
            # cache (half the experts) + staging buffer of top_k experts at most
            assert tl.mem_experts.max() <= (m.total_experts // 2 + m.top_k) * m.bytes_per_expert


def test_the_staging_buffer_counts_alike_for_policies_that_fetch_and_that_reroute(tiny_trace_path):
    """Memory on equal terms: the staging buffer (top_k slots) is allocated with the cache (the
    replay holds it from the start), so a policy that reroutes its misses, and so never streams,
    counts it as one that fetches them does. Counted only on steps that streamed, it made a
    rerouting policy report top_k experts less than it reserves, and `emoe choose`'s default
    (least memory) could pick a rerouting eMoE over LRU for that alone."""
    m = get_model("tiny")
    runs = {miss: run_scenario(tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5, "miss": miss}))
            for miss in ("fetch", "reroute")}
    reserved = (m.total_experts // 2 + m.top_k) * m.bytes_per_expert      # the cache, full from the start, + staging
    for miss, r in runs.items():
        assert r.summary["peak_experts_bytes"] == reserved, miss
        assert (r.timeline.mem_experts >= m.top_k * m.bytes_per_expert).all(), miss


def test_kv_stays_within_its_budget_with_preemption(tiny_trace_path):
    # Few KV slots: requests must wait or be preempted, and still all complete.
    sc = tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5},
                       hardware__memory_bytes=2.65e6, workload__arrival={"process": "batch"})
    r = run_scenario(sc)
    assert r.requests.completed.all()
    assert (r.timeline.mem_kv <= r.summary["kv_budget_bytes"] + 1).all()
    assert r.summary["preemptions"] > 0 and r.timeline.waiting.max() > 0


def test_bytes_loaded_count_every_copy_once_under_fetch(runs):
    """Every copy is a miss (an expert the step used, copied during it) or a prefetch of an
    expert its step did not use; policies without such prefetches load only their misses."""
    bpe = get_model("tiny").bytes_per_expert
    for name in ("on_demand", "on_demand-lfu", "pregated", "oracle", "moe_infinity"):
        s = runs[name].summary
        assert s["bytes_loaded"] == (s["misses"] + s["prefetches_ahead"]) * bpe, name
        assert s["misses"] > 0
        copies = runs[name].timeline.expert_loads.sum()      # as issued: dropped ones included
        assert copies == s["misses"] + s["prefetches_ahead"] + s["prefetches_dropped"], name
    for name in ("on_demand", "on_demand-lfu", "oracle"):
        assert runs[name].summary["prefetches_ahead"] == 0, name


def test_resident_has_no_misses(runs):
    s = runs["resident"].summary
    assert s["misses"] == 0 and s["bytes_loaded"] == 0 and s["expert_hit_rate"] == 1.0
    assert s["routing_fidelity"] == pytest.approx(1.0)


def test_reroute_keeps_memory_but_loses_fidelity(runs):
    s = runs["random"].summary
    assert s["bytes_loaded"] == 0 and s["reroutes"] > 0
    assert 0.3 < s["routing_fidelity"] < 1.0
    assert runs["on_demand"].summary["routing_fidelity"] == pytest.approx(1.0)


def test_oracle_misses_no_more_than_any_policy_at_same_capacity(tiny_trace_path):
    # Batches must not depend on timing: everything arrives at t=0.
    loads = {}
    for pol in FETCH_POLICIES:
        sc = tiny_scenario(tiny_trace_path, pol, workload__arrival={"process": "batch"})
        s = run_scenario(sc).summary
        loads[pol["name"] + pol.get("eviction", "")] = s["misses"] + s["prefetches_ahead"]
    assert loads["oracle"] == min(loads.values()), loads


def test_same_seed_same_results(tiny_trace_path):
    a = run_scenario(tiny_scenario(tiny_trace_path, {"name": "moe_infinity", "capacity": 0.5}))
    b = run_scenario(tiny_scenario(tiny_trace_path, {"name": "moe_infinity", "capacity": 0.5}))
    assert a.summary == b.summary
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.timeline, b.timeline)
    c = run_scenario(tiny_scenario(tiny_trace_path, {"name": "moe_infinity", "capacity": 0.5}, seed=2))
    assert not np.allclose(c.requests.arrival_s, a.requests.arrival_s)


def test_less_memory_costs_latency(runs):
    """On-demand loading trades memory for time (the paper's Observation 1, in miniature)."""
    res, od = runs["resident"].summary, runs["on_demand"].summary
    assert od["peak_experts_bytes"] < res["peak_experts_bytes"]
    assert od["e2e_mean_s"] > res["e2e_mean_s"]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_waiting_queue_stays_in_scheduler_order(tiny_trace_path, name):
    """Admission follows the scheduler's key: with one request at a time, admissions happen in key order."""
    from sim.engine import Engine
    from sim.run import build
    from sim.workload import build_requests
    sc = tiny_scenario(tiny_trace_path, {"name": "resident"}, scheduler={"name": name},
                       workload__arrival={"process": "batch"}, limits={"max_batch_tokens": 256, "max_running": 1})
    model, hw, trace, policy, sched = build(sc)
    reqs = build_requests(sc, trace)
    Engine(model, hw, trace, reqs, policy, sched, sc["limits"]).run()
    order = sorted(reqs, key=lambda r: r.admitted_s)
    keys = [sched.key(r, 0.0) for r in order if r.preemptions == 0]
    assert keys == sorted(keys)


@pytest.mark.parametrize("name", sorted(n for n, c in POLICIES.items() if "miss" in c.Params.names()))
def test_every_cache_policy_offers_both_miss_modes_and_names_its_copies(tiny_trace_path, name, monkeypatch):
    """Both miss modes for every cache policy (fetch: exact routing; reroute: no demand copy,
    gate mass lost instead), and every expert a plan makes resident is one of its copies: a
    demand copy of a used expert or a prefetch issued no later than its layer starts."""
    cls = POLICIES[name]
    plan_step = cls.plan_step
    mode = {}

    def checked(self, batch):
        before = self.resident.copy()
        plan = plan_step(self, batch)
        used = plan.counts > 0
        prefetched = np.zeros_like(before)
        for at, layer, e in plan.prefetch:
            prefetched[layer, e] = True
            assert not used[layer, e] or at <= 2 * layer, (at, layer, e)
        assert not (self.resident & ~before & ~(used | prefetched)).any(), "made resident without a copy"
        cold = getattr(self, "warm", True) is False      # eMoE fetches until its predictor knows something
        assert mode["miss"] == "fetch" or cold or not plan.demand.any()
        mode["steps"] += 1
        return plan
    monkeypatch.setattr(cls, "plan_step", checked)
    summaries = {}
    for miss in ("fetch", "reroute"):
        mode.update(miss=miss, steps=0)
        summaries[miss] = run_scenario(tiny_scenario(tiny_trace_path, {"name": name, "capacity": 0.5,
                                                                       "miss": miss})).summary
        assert mode["steps"] > 0
    fetch, reroute = summaries["fetch"], summaries["reroute"]
    assert fetch["routing_fidelity"] == pytest.approx(1.0) and fetch["reroutes"] == 0
    assert reroute["routing_fidelity"] < 1.0 and reroute["reroutes"] > 0
    assert fetch["requests_completed"] == reroute["requests_completed"] == 40


@pytest.mark.parametrize("kw", [dict(max_running=1), dict(arrival={"process": "poisson", "rate": 0.02})],
                         ids=["all at once, one slot", "light load"])
def test_a_run_whose_last_requests_are_refused_ends(kw):
    """Prompts too large for the KV left are refused at admission; when they are the last
    requests and nothing runs, the run ends with them refused (it used to wait for an
    arrival that would never come: SimPy's 'No scheduled events left')."""
    from tests.test_batch_run import scenario
    r = run_scenario(scenario({"name": "on_demand", "capacity": 0.25}, hardware={"memory_bytes": 7.4e9},
                              requests=30, **kw))
    assert r.summary["requests_completed"] + r.summary["requests_rejected"] == 30
    assert r.summary["requests_rejected"] > 0 and not r.summary.get("stopped_early")
