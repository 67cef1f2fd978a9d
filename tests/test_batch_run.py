"""Saturation: the same requests' decode steps planned at once (batch runs) must match stepping."""
import copy

import numpy as np
import pandas as pd
import pytest

from sim.engine import Engine
from sim.policies import make_policy
from sim.policies.base import StepBatch
from sim.request import Request
from sim.run import run_scenario
from sim.scenario import load_scenario
from tests.test_decode_run import SAMPLE, routing
from traces.model_shape import get_model


def requests(n):
    return [Request(index=i, rid=f"r{i}", task=("qa", "code", "math")[i % 3], prompt_tokens=8, output_tokens=500,
                    row0=0, arrival_s=0.0, slo={}, expected_output=8.0) for i in range(n)]


def batch(ex, reqs):
    """One step: ex (B, L, k), token b of request b."""
    return StepBatch(step=0, experts=ex, gates=np.full(ex.shape, 1 / ex.shape[-1], dtype=np.float32), probs=None,
                     token_req=np.arange(len(reqs)), requests=reqs)


CASES = [("mixtral-8x7b", {"name": "on_demand", "capacity": c, "eviction": ev}, B)
         for c in (0.25, 0.5, 0.75) for ev in ("lru", "lfu") for B in (2, 5, 16)] + [
    ("olmoe-1b-7b", {"name": "on_demand", "capacity": 0.3}, 12),
    ("olmoe-1b-7b", {"name": "on_demand", "capacity": 0.3, "eviction": "lfu"}, 40),
    ("mixtral-8x7b", {"name": "resident"}, 8)]


@pytest.mark.parametrize("model,spec,B", CASES, ids=lambda x: x if isinstance(x, (str, int)) else
                         "-".join(str(v) for v in x.values()))
def test_batch_run_equals_steps_from_any_state(model, spec, B):
    """Every decision and counter of T steps of B requests, planned at once, equals stepping:
    with few and many tokens a step (a step that uses more experts than the cache holds streams
    some through), from an irregular starting state."""
    m = get_model(model)
    rng = np.random.default_rng(B)
    pol = make_policy(spec, m, None, 0)
    assert pol.plans_batch_runs
    warm = requests(1)
    for _ in range(3):
        pol.plan_step(batch(routing(rng, 3, m.n_moe_layers, m.n_experts, m.top_k), warm * 3))
    T = 60
    ex = np.stack([routing(rng, B, m.n_moe_layers, m.n_experts, m.top_k) for _ in range(T)])   # (T, B, L, k)
    ref, reqs_ref, reqs = copy.deepcopy(pol), requests(B), requests(B)
    demand, resident, counts, streamed = [], [], [], []
    for t in range(T):
        plan = ref.plan_step(batch(ex[t], reqs_ref))
        demand.append(plan.demand)
        counts.append(plan.counts)
        resident.append(int(ref.resident.sum()))
        streamed.append(np.zeros(m.n_moe_layers, dtype=np.int64) if plan.streamed is None else plan.streamed)
    run = pol.plan_batch_run(StepBatch(step=0, experts=ex, gates=np.full(ex.shape, 0.5, dtype=np.float32),
                                       probs=None, token_req=np.tile(np.arange(B), T), requests=reqs))
    np.testing.assert_array_equal(run.demand, demand)
    np.testing.assert_array_equal(run.resident, resident)
    np.testing.assert_array_equal(run.counts, counts)
    np.testing.assert_array_equal(np.zeros_like(run.demand) if run.streamed is None else run.streamed, streamed)
    if spec["name"] == "on_demand":
        assert sum(d.sum() for d in demand) > 0
    if spec["name"] == "on_demand" and B == 16 and spec["capacity"] < 0.75:
        assert sum(s.sum() for s in streamed) > 0, "no step overflowed the cache"
    np.testing.assert_array_equal(pol.resident, ref.resident)
    for name in ("hits", "misses", "loads", "ahead_loads", "routes", "reroutes", "gate_kept"):
        assert getattr(pol.accounting, name) == getattr(ref.accounting, name), name
    for name in ("sensitive_kept", "sensitive_routes"):
        assert getattr(pol.accounting, name) == getattr(ref.accounting, name), name
    np.testing.assert_array_equal(pol.rerouter.popularity, ref.rerouter.popularity)
    for name in ("last_used", "freq", "clock"):
        if hasattr(ref, name):
            np.testing.assert_array_equal(getattr(pol, name), getattr(ref, name), err_msg=name)
    for r, q in zip(reqs, reqs_ref):
        assert (r.hits, r.misses, r.routes, r.reroutes, r.gate_kept) == (q.hits, q.misses, q.routes, q.reroutes,
                                                                          q.gate_kept)


def scenario(policy, scheduler="fcfs", arrival=None, hardware=None, requests=60, e2e_slo=60.0, **limits):
    return load_scenario(data={
        "name": "sat", "model": "mixtral-8x7b", "hardware": {"preset": "a100-40gb", "count": 4, **(hardware or {})},
        "workload": {"trace": str(SAMPLE), "requests": requests, "arrival": arrival or {"process": "batch"},
                     "slo": {"default": {"ttft_s": 5.0, "e2e_s": e2e_slo}}},
        "policy": policy, "scheduler": {"name": scheduler},
        "limits": {"max_batch_tokens": 1024, "max_running": 8, **limits}})


LRU = {"name": "on_demand", "capacity": 0.5}
ENGINE_CASES = [
    ("all at t=0", LRU, "fcfs", None, None, {}),
    ("lfu, small cache", {"name": "on_demand", "capacity": 0.25, "eviction": "lfu"}, "fcfs", None, None, {}),
    ("resident, sjf", {"name": "resident"}, "sjf", None, None, {}),
    ("arrivals during runs", LRU, "fcfs", {"process": "poisson", "rate": 1.0}, None, {}),
    ("light load: runs cut by arrivals", LRU, "edf", {"process": "poisson", "rate": 0.1}, None, {"max_running": 4}),
    ("max_steps", LRU, "fcfs", None, None, {"max_steps": 700}),
    ("max_sim_time_s", LRU, "fcfs", None, None, {"max_sim_time_s": 30.0}),
    ("KV runs out: preemptions", LRU, "fcfs", None, {"memory_bytes": 13.8e9}, {"max_running": 32}),
    ("KV in blocks", LRU, "fcfs", None, {"measured": {"kv_block_tokens": 16}}, {}),
    ("KV-bound queue, first come first served, arrivals", LRU, "fcfs", {"process": "poisson", "rate": 2.0},
     {"memory_bytes": 13.8e9}, {"max_running": 32}),
    ("KV-bound queue, SJF: runs cut at each arrival", LRU, "sjf", {"process": "poisson", "rate": 2.0},
     {"memory_bytes": 13.8e9}, {"max_running": 32}),
    ("KV-bound queue, EDF: runs cut at each arrival", LRU, "edf", {"process": "poisson", "rate": 2.0},
     {"memory_bytes": 13.8e9}, {"max_running": 32}),
    ("fast link: staging slots bind", {"name": "on_demand", "capacity": 0.25}, "fcfs", None,
     {"h2d_bytes_per_s": 5e12}, {}),
    ("eMoE scheduler: no runs while requests wait", LRU, "emoe", {"process": "poisson", "rate": 1.0}, None, {}),
]


@pytest.mark.parametrize("name,policy,scheduler,arrival,hardware,limits", ENGINE_CASES,
                         ids=[c[0] for c in ENGINE_CASES])
def test_engine_results_identical_with_and_without_batch_runs(monkeypatch, name, policy, scheduler, arrival,
                                                              hardware, limits):
    """Requests, timeline (per-step memory, waiting counts, copies, stalls) and summary of a
    saturated run are stepping's, wherever runs are cut (a finishing request, an arrival that
    could join, max_steps, max_sim_time_s, a preemption) and whatever the steps' copies do."""
    steps, blocked = [], []
    real = Engine._batch_run

    def counting(self, now):
        r = real(self, now)
        steps.append(r[1] if r else 0)
        if r and self.n_waiting and len(self.running) < self.max_running:
            blocked.append(r[1])     # a run while the queue's head waits for KV
        return r
    monkeypatch.setattr(Engine, "_batch_run", counting)
    fast = run_scenario(scenario(policy, scheduler, arrival, hardware, **limits))
    slow = run_scenario(scenario(policy, scheduler, arrival, hardware, **limits, decode_runs=False))
    # (the eMoE scheduler's admission has side effects: runs only while nobody waits)
    few = "eMoE" in name
    assert sum(steps) > (0 if few else 0.3 * slow.summary["engine_steps"]), "batch runs were not taken"
    identical(fast, slow)
    if name.startswith("KV runs out"):
        assert slow.summary["preemptions"] > 0
    if name.startswith("KV-bound"):                # requests waited with free slots
        t = slow.timeline
        assert ((t.waiting > 0) & (t.running < 32)).mean() > 0.3
        assert sum(blocked) > 100
    if name.startswith("arrivals"):
        assert (fast.timeline.waiting.diff() > 0).sum() > 10      # the queue grew during runs
    if name.startswith("fast link"):
        assert fast.timeline.stall_s.sum() > 0


@pytest.mark.parametrize("policy,limits", [(LRU, {}), ({"name": "on_demand", "capacity": 0.25, "eviction": "lfu"}, {}),
                                          (LRU, {"max_batch_tokens": 96}), (LRU, {"measured_kv": True})],
                         ids=["lru", "lfu", "prompts in chunks", "KV in blocks"])
def test_runs_that_start_by_prefilling_the_requests_that_joined(monkeypatch, policy, limits):
    """At saturation a request joins as another finishes, and the step that prefills it leads
    the batch run after it: that step's tokens, context, KV, activations, copies and its
    requests' first tokens are stepping's. A prompt split over steps leads a run with its last
    chunk (the chunks before are stepped)."""
    led = []
    real = Engine._batch_run

    def counting(self, now):
        joining = [r for r in self.running if r.in_prefill]
        got = real(self, now)
        if got and joining:
            led.append(len(joining))
        return got
    monkeypatch.setattr(Engine, "_batch_run", counting)
    limits = dict(limits)
    hardware = {"measured": {"kv_block_tokens": 16}} if limits.pop("measured_kv", False) else None
    fast = run_scenario(scenario(policy, hardware=hardware, requests=40, **limits))
    slow = run_scenario(scenario(policy, hardware=hardware, requests=40, **limits, decode_runs=False))
    identical(fast, slow)
    assert len(led) >= 20, led                    # most admissions (40 requests, 8 running)
    if "max_batch_tokens" in limits:
        assert (slow.requests.prompt_tokens > 96).sum() > 5      # prompts were split


def identical(fast, slow):
    assert slow.summary["engine_steps"] == fast.summary["engine_steps"]
    pd.testing.assert_frame_equal(fast.requests, slow.requests, rtol=1e-12)
    pd.testing.assert_frame_equal(fast.timeline, slow.timeline, rtol=1e-12)
    for k, v in slow.summary.items():
        if isinstance(v, (int, float)):
            assert fast.summary[k] == pytest.approx(v, rel=1e-12), k
        else:
            assert fast.summary[k] == v, k


def test_emoe_scheduler_sees_every_arrival_of_a_full_run():
    """The eMoE scheduler's select() records the requests it holds back at every step, even
    when nothing fits: a full run is cut at each arrival so it sees them as stepping does."""
    kw = dict(scheduler="emoe", arrival={"process": "poisson", "rate": 0.5}, e2e_slo=100.0, max_running=4)
    fast = run_scenario(scenario(LRU, **kw))
    slow = run_scenario(scenario(LRU, **kw, decode_runs=False))
    assert slow.summary["requests_held_back"] >= 4
    identical(fast, slow)


@pytest.mark.parametrize("case", ["at a run's end", "at one step's start", "at two steps' starts"])
def test_arrivals_tied_with_step_starts(monkeypatch, case):
    """Arrivals at exactly a step's start (float-equal): SimPy handles the event set first, and a
    batch run orders them, and counts them in its timeline, as stepping does (SJF: the late
    short request overtakes the queue when it is there in time)."""
    import sim.workload as workload
    arrivals = [0, 2e4, 0, 0, 1e4, 1e4 + 1, 2e4, 0]
    monkeypatch.setattr(workload, "arrival_times", lambda sc, trace: np.array(arrivals, dtype=float))
    ends = []
    real = Engine._advance_run

    def advance(self, reqs, n, now):
        ends.append(now)
        return real(self, reqs, n, now)
    monkeypatch.setattr(Engine, "_advance_run", advance)

    def both():
        return (run_scenario(scenario(LRU, "sjf", requests=8, max_running=4)),
                run_scenario(scenario(LRU, "sjf", requests=8, max_running=4, decode_runs=False)))
    _, slow = both()
    first_end = ends[0]
    t = slow.timeline.t_s.to_numpy()
    assert first_end in t                     # a stepped step starts where the first run ended
    j = int(np.searchsorted(t, first_end)) - 60
    arrivals[4:6] = {"at a run's end": [first_end - 1.0, first_end], "at one step's start": [t[j], 1e4],
                     "at two steps' starts": [t[j - 1], t[j]]}[case]
    fast, slow = both()
    identical(fast, slow)


@pytest.mark.parametrize("scheduler", ["fcfs", "sjf"])
def test_two_arrivals_at_once_at_a_run_step_start(monkeypatch, scheduler):
    """Two requests arriving in one event at exactly the start of a run's second step (after the
    step that prefills the requests that joined, which starts at the instant an arrival woke the
    engine): both are counted waiting from that step, as stepping counts them (a review found
    the second counted a step late)."""
    import sim.workload as workload
    arrivals = [0.0] * 7 + [1e5] * 7 + [2e5] * 2
    monkeypatch.setattr(workload, "arrival_times", lambda sc, trace: np.array(arrivals, dtype=float))

    def go(**kw):
        return run_scenario(scenario(LRU, scheduler, requests=16, max_running=3, **kw))
    t = go(decode_runs=False).timeline
    p = int(np.searchsorted(t.t_s.to_numpy(), 1e5))       # the step at 1e5 prefills the 3 that join
    assert t.prefill_tokens[p] > 0
    arrivals[14:16] = [t.t_s[p + 1]] * 2                   # both arrive as the next step starts
    identical(go(), go(decode_runs=False))


def test_a_subclass_that_resizes_the_cache_is_stepped():
    """Runs assume the class's cache size (resident: every expert held); a subclass that sizes
    it otherwise overrides a hook the runs rely on, so it is stepped unless it declares runs."""
    from sim.policies.resident import ResidentPolicy

    class HalfResident(ResidentPolicy):
        def _capacity_per_layer(self):
            return np.full(self.L, self.E // 2, dtype=np.int64)
    pol = HalfResident(get_model("mixtral-8x7b"), {})
    assert not pol.plans_decode_runs and not pol.plans_batch_runs
    assert ResidentPolicy(get_model("mixtral-8x7b"), {}).plans_batch_runs
    with pytest.raises(TypeError, match="declare"):
        class Sneaky(ResidentPolicy):
            @property
            def plans_batch_runs(self):
                return True


@pytest.mark.parametrize("name, hook", [("moe_infinity", "_observe"), ("moe_infinity", "admit_prefetch"),
                                        ("oracle", "_steps_to_next_use")])
def test_a_subclass_that_changes_what_a_prefetching_policy_does_is_stepped(name, hook):
    """A prefetching policy's runs restate what its steps do (MoE-Infinity's EAM update and
    prefetch admission, the oracle's look-ahead): a subclass that overrides one of those is
    stepped, not run with its parent's restatement (a review found these outside the hooks)."""
    from sim.policies import POLICIES
    parent = POLICIES[name]
    child = type(f"Custom{parent.__name__}", (parent,), {hook: getattr(parent, hook)})
    assert parent.decode_runs and not child.decode_runs and not child.batch_runs


ORACLE_CASES = [("light load: two at a time", {"name": "oracle", "capacity": 0.6},
                 {"process": "poisson", "rate": 0.3}, {"max_running": 2}),
                ("saturated, two running", {"name": "oracle", "capacity": 0.5, "horizon": 16},
                 None, {"max_running": 2}),
                ("saturated, four running: layers overflow", {"name": "oracle", "capacity": 0.5},
                 None, {"max_running": 4})]


@pytest.mark.parametrize("name,policy,arrival,limits", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_oracle_batch_runs_change_nothing(monkeypatch, name, policy, arrival, limits):
    """The oracle's batch runs (Belady over the running requests' routing ahead, prefetching one
    layer ahead): stepping's results, cut before a step whose layer uses more experts than it
    holds (that step streams some on demand, and is stepped)."""
    steps = []
    real = Engine._batch_run

    def counting(self, now):
        r = real(self, now)
        steps.append(r[1] if r else 0)
        return r
    monkeypatch.setattr(Engine, "_batch_run", counting)
    fast = run_scenario(scenario(policy, "fcfs", arrival, None, requests=30, **limits))
    slow = run_scenario(scenario(policy, "fcfs", arrival, None, requests=30, **limits, decode_runs=False))
    identical(fast, slow)
    assert slow.timeline.expert_loads.sum() > 0 and slow.timeline.stall_s.sum() > 0
    several = int((slow.timeline.batch_requests > 1).sum())
    if "overflow" in name:     # four tokens a step use more experts than a layer holds: mostly stepped
        assert 0 < sum(steps) < several / 10
    else:
        assert sum(steps) > 0.8 * several, "batch runs were not taken"


@pytest.mark.parametrize("capacity,B,alike", [(0.5, 2, 0), (0.25, 2, 0), (0.5, 3, 0), (0.375, 2, 0), (0.375, 2, 7)])
def test_oracle_batch_run_equals_steps(capacity, B, alike):
    """plan_batch_run of the oracle equals its plan_step over the steps it plans, and plans up to
    the first step where a layer uses more experts than it holds (None if within two steps).
    alike: steps in which every request routes as the first does (so few experts are used)."""
    from traces.format import load_trace
    trace = load_trace(SAMPLE)
    m = get_model("mixtral-8x7b")
    pol = make_policy({"name": "oracle", "capacity": capacity, "horizon": 32}, m, trace, 0)
    reqs = [Request(index=i, rid=f"r{i}", task="qa", prompt_tokens=4, output_tokens=300, row0=350 * i,
                    arrival_s=0.0, slo={}, expected_output=8.0) for i in range(B)]
    for r in reqs:
        r.prefilled, r.generated = 4, 1

    def rows_now(rs):
        return np.array([r.next_row for r in rs])

    ref, reqs_ref = copy.deepcopy(pol), copy.deepcopy(reqs)
    T = 120
    ex = np.stack([trace.experts[rows_now(reqs) + t] for t in range(T)])              # (T, B, L, k)
    ex[:alike] = ex[:alike, :1]
    run = pol.plan_batch_run(StepBatch(step=0, experts=ex, gates=None, probs=None, token_req=np.tile(np.arange(B), T),
                                       requests=reqs))
    used = np.stack([np.add.reduce(ref._needed(ex[t]) > 0, axis=1) for t in range(T)])  # (T, L) experts used
    over = (used > ref.capacity).any(axis=1)
    planned = int(over.argmax()) if over.any() else T
    if planned < 2:
        assert run is None
        return
    assert len(run.counts) == planned
    assert not alike or planned == alike
    pre, resident = [], []
    for t in range(planned):
        plan = ref.plan_step(StepBatch(step=t, experts=ex[t], gates=trace.gates[rows_now(reqs_ref)], probs=None,
                                       token_req=np.arange(B), requests=reqs_ref))
        assert not plan.demand.any()
        pre.append(np.bincount([layer for _, layer, _ in plan.prefetch], minlength=m.n_moe_layers))
        resident.append(int(ref.resident.sum()))
        for r in reqs_ref:
            r.generated += 1
    np.testing.assert_array_equal(run.prefetch, np.array(pre))
    assert run.prefetch.sum() > 0
    np.testing.assert_array_equal(run.resident, resident)
    np.testing.assert_array_equal(pol.resident, ref.resident)
    for name in ("hits", "misses", "loads", "ahead_loads", "routes", "reroutes", "gate_kept", "sensitive_kept"):
        assert getattr(pol.accounting, name) == getattr(ref.accounting, name), name
    for r, q in zip(reqs, reqs_ref):
        assert (r.hits, r.misses, r.routes) == (q.hits, q.misses, q.routes)
