"""Light load: a lone request's decode steps planned at once must match stepping one by one."""
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.engine import Engine
from sim.policies import POLICIES, make_policy
from sim.policies.base import MISS_MODES, ExpertPolicy, StepBatch
from sim.policies.on_demand import OnDemandPolicy
from sim.request import Request
from sim.run import run_scenario
from sim.scenario import load_scenario
from traces.model_shape import get_model

SAMPLE = Path(__file__).parent.parent / "traces" / "samples" / "mixtral-8x7b-mixed.npz"


def routing(rng, n, L, E, k):
    """(n, L, k) distinct experts per token and layer, skewed so the cache sees reuse."""
    p = rng.dirichlet(np.full(E, 0.3), size=L)
    return np.stack([np.stack([rng.choice(E, k, replace=False, p=p[l]) for l in range(L)]) for _ in range(n)])


def token_batch(ex, req, probs=None):
    gates = np.full(ex.shape, 1 / ex.shape[-1], dtype=np.float32)
    return StepBatch(step=0, experts=ex, gates=gates, probs=probs, token_req=np.zeros(len(ex), dtype=np.int64),
                     requests=[req])


def step_by_step(policy, experts, req, probs=None):
    demand, resident, counts = [], [], []
    for t in range(len(experts)):
        plan = policy.plan_step(token_batch(experts[t:t + 1], req, None if probs is None else probs[t:t + 1]))
        assert not plan.prefetch and not plan.extra_time_s
        demand.append(plan.demand)
        counts.append(plan.counts)
        resident.append(int(policy.resident.sum()))
    return np.array(demand), np.array(resident), np.array(counts)


class MRUProbe(OnDemandPolicy):
    """A four-line subclass overriding only evict_key (most recently used first): the LRU
    decode run does not describe it, so it must be stepped."""
    name = "mru_probe"

    def evict_key(self, batch):
        return -self.last_used


def registry_specs(capacity=0.5):
    """Every registered policy in each of its miss modes: a policy registered later is covered."""
    for name, cls in sorted(POLICIES.items()):
        for miss in MISS_MODES if "miss" in cls.Params.names() else (None,):
            spec = {"name": name}
            if "capacity" in cls.Params.names():
                spec["capacity"] = capacity
            if miss:
                spec["miss"] = miss
            yield spec


def plannable():
    """(model, spec) pairs whose fresh policy plans decode runs (from the registry)."""
    out = []
    for model in ("mixtral-8x7b", "olmoe-1b-7b"):
        for capacity in (0.3, 0.5):
            for spec in registry_specs(capacity):
                if make_policy(spec, get_model(model)).plans_decode_runs:
                    out.append((model, spec))
    for model, spec in [("olmoe-1b-7b", {"name": "on_demand", "capacity": 0.3, "miss": "reroute",
                                         "eviction": "lfu"}),
                        ("mixtral-8x7b", {"name": "on_demand", "capacity": 0.3, "eviction": "lfu"}),
                        ("mixtral-8x7b", {"name": "on_demand", "capacity": 0.5, "eviction": "lfu"}),
                        ("olmoe-1b-7b", {"name": "on_demand", "capacity": 0.3, "eviction": "lfu"}),
                        ("qwen3-30b-a3b", {"name": "on_demand", "capacity": 0.4, "eviction": "lfu"})]:
        out.append((model, spec))
    return out


STOP_BEFORE_PREFETCH = {"moe_infinity"}   # decode runs that plan the steps before one that prefetches


def test_the_registry_gives_decode_run_cases():
    names = {spec["name"] for _, spec in plannable()}
    assert {"on_demand", "resident", "random"} <= names


@pytest.mark.parametrize("model,spec", plannable(), ids=lambda x: x if isinstance(x, str) else
                         "-".join(str(v) for v in x.values()))
@pytest.mark.parametrize("seed,with_probs", [(0, False), (1, False), (2, True)])
def test_decode_run_equals_steps_from_any_state(model, spec, seed, with_probs):
    m = get_model(model)
    rng = np.random.default_rng(seed)
    pol = make_policy(spec, m, None, seed)
    # An irregular starting state: a few multi-token steps (several experts per layer at once).
    warm = Request(index=0, rid="w", task="qa", prompt_tokens=8, output_tokens=8, row0=0, arrival_s=0.0, slo={},
                   expected_output=8.0)
    for t in range(3):
        ex = routing(rng, 5, m.n_moe_layers, m.n_experts, m.top_k)
        pol.plan_step(StepBatch(step=t, experts=ex, gates=np.full(ex.shape, 1 / m.top_k, dtype=np.float32),
                                probs=None, token_req=np.zeros(5, dtype=np.int64), requests=[warm]))
    experts = routing(rng, 120, m.n_moe_layers, m.n_experts, m.top_k)
    probs = rng.dirichlet(np.ones(m.n_experts), size=(120, m.n_moe_layers)).astype(np.float32) if with_probs \
        else None
    ref, req_ref = copy.deepcopy(pol), Request(index=1, rid="r", task="qa", prompt_tokens=8, output_tokens=200,
                                               row0=0, arrival_s=0.0, slo={}, expected_output=8.0)
    assert pol.plans_decode_runs
    req = Request(index=1, rid="r", task="qa", prompt_tokens=8, output_tokens=200, row0=0, arrival_s=0.0,
                  slo={}, expected_output=8.0)
    run = pol.plan_decode_run(token_batch(experts, req, probs))
    if spec["name"] in STOP_BEFORE_PREFETCH:    # a run ends before a step that prefetches
        if run is None:
            np.testing.assert_array_equal(pol.resident, ref.resident)   # (nothing changed)
            assert pol.accounting.hits == ref.accounting.hits
            return
        experts = experts[:len(run.counts)]
    demand, resident, counts = step_by_step(ref, experts, req_ref, probs)
    np.testing.assert_array_equal(run.demand, demand)
    np.testing.assert_array_equal(run.resident, resident)
    np.testing.assert_array_equal(run.counts, counts)
    assert demand.sum() > 0 or spec["name"] in ("resident", "random") or spec.get("miss") == "reroute"
    assert ref.accounting.reroutes > 0 or spec["name"] in ("resident", "on_demand", "moe_infinity") \
        and spec.get("miss") != "reroute"
    np.testing.assert_array_equal(pol.resident, ref.resident)
    acc, acc_ref = pol.accounting, ref.accounting
    for name in ("hits", "misses", "loads", "ahead_loads", "routes", "reroutes"):
        assert getattr(acc, name) == getattr(acc_ref, name), name
    assert getattr(pol, "clock", None) == getattr(ref, "clock", None)
    np.testing.assert_array_equal(pol.rerouter.popularity, ref.rerouter.popularity)
    for name in ("last_used", "freq"):
        if hasattr(ref, name):
            np.testing.assert_array_equal(getattr(pol, name), getattr(ref, name), err_msg=name)
    # Float sums over many steps: same terms, possibly another order.
    for name in ("gate_kept", "sensitive_kept", "sensitive_routes"):
        assert getattr(acc, name) == pytest.approx(getattr(acc_ref, name), rel=1e-12), name
    assert (req.hits, req.misses, req.routes, req.reroutes) == (req_ref.hits, req_ref.misses, req_ref.routes,
                                                                 req_ref.reroutes)
    assert req.gate_kept == pytest.approx(req_ref.gate_kept, rel=1e-12)


def test_policies_that_prefetch_step_normally():
    """A decode run's copies are on demand, or the oracle's prefetches of what its own layers
    use (CostModel.decode_run has no queue carried between steps); MoE-Infinity's runs stop
    before a step that prefetches. The pre-gate, which may copy what a step does not use at
    any step, the oracle without routing ahead, and rerouting prefetchers step."""
    m = get_model("mixtral-8x7b")
    assert make_policy({"name": "on_demand", "eviction": "lfu"}, m).plans_decode_runs
    assert make_policy({"name": "on_demand", "eviction": "lfu"}, get_model("qwen3-30b-a3b")).plans_decode_runs
    for spec in ({"name": "pregated"}, {"name": "pregated", "recall": 0.8}, {"name": "pregated", "miss": "reroute"},
                 {"name": "oracle"}, {"name": "moe_infinity", "miss": "reroute"}):
        assert not make_policy(spec, m).plans_decode_runs, spec
    for spec in ({"name": "moe_infinity"}, {"name": "moe_infinity", "prefetch_per_step": 4, "rematch_every": 4}):
        assert make_policy(spec, m).plans_decode_runs, spec
    from traces.format import load_trace
    trace = load_trace(SAMPLE)
    assert make_policy({"name": "oracle", "horizon": 8}, m, trace).plans_decode_runs
    assert not make_policy({"name": "oracle", "miss": "reroute"}, m, trace).plans_decode_runs


@pytest.mark.parametrize("capacity,horizon,left", [(0.25, 64, 400), (0.5, 8, 400), (0.75, 3, 400),
                                                   (0.5, 64, 30)])    # the look-ahead reaches the request's end
def test_oracle_decode_run_equals_steps(capacity, horizon, left):
    """Belady's decode run: the same misses (each step's prefetches, per layer), residency and
    counters as the oracle's plan_step step by step, from an irregular state."""
    from traces.format import load_trace
    trace = load_trace(SAMPLE)
    m = get_model("mixtral-8x7b")
    pol = make_policy({"name": "oracle", "capacity": capacity, "horizon": horizon}, m, trace, 0)
    row0 = 40
    req = Request(index=0, rid="r", task="qa", prompt_tokens=10, output_tokens=400, row0=row0, arrival_s=0.0,
                  slo={}, expected_output=8.0)
    req.prefilled = 10
    for g in range(1, 6):                         # a few steps of another state first
        req.generated = g
        r = req.next_row
        pol.plan_step(StepBatch(step=g, experts=trace.experts[r:r + 1], gates=trace.gates[r:r + 1], probs=None,
                                token_req=np.zeros(1, dtype=np.int64), requests=[req]))
    start = req.output_tokens - left + 1            # the run decodes its last `left` tokens
    ref, req_ref = copy.deepcopy(pol), copy.deepcopy(req)
    pre, resident, counts = [], [], []
    for t in range(left - 1):
        req_ref.generated = start + t
        r = req_ref.next_row
        plan = ref.plan_step(StepBatch(step=t, experts=trace.experts[r:r + 1], gates=trace.gates[r:r + 1],
                                       probs=None, token_req=np.zeros(1, dtype=np.int64), requests=[req_ref]))
        assert not plan.demand.any() and all(at == 2 * max(layer - 1, 0) for at, layer, _ in plan.prefetch)
        pre.append(np.bincount([layer for _, layer, _ in plan.prefetch], minlength=m.n_moe_layers))
        resident.append(int(ref.resident.sum()))
        counts.append(plan.counts)
    req.generated = start
    r = req.next_row
    n = left - 1
    run = pol.plan_decode_run(StepBatch(step=0, experts=trace.experts[r:r + n], gates=trace.gates[r:r + n],
                                        probs=None, token_req=np.zeros(n, dtype=np.int64), requests=[req]))
    np.testing.assert_array_equal(run.prefetch, np.array(pre))
    assert run.prefetch.sum() > 0 and not run.demand.any()
    np.testing.assert_array_equal(run.resident, resident)
    np.testing.assert_array_equal(run.counts, counts)
    np.testing.assert_array_equal(pol.resident, ref.resident)
    for name in ("hits", "misses", "loads", "ahead_loads", "routes", "reroutes"):
        assert getattr(pol.accounting, name) == getattr(ref.accounting, name), name
    np.testing.assert_array_equal(pol.rerouter.popularity, ref.rerouter.popularity)
    assert (req.hits, req.misses, req.routes) == (req_ref.hits, req_ref.misses, req_ref.routes)


def test_decode_run_eligibility_is_declared_per_class():
    """Decided once, when the class is made: overriding a hook the runs assume drops it,
    declaring again keeps it, and overriding the property itself is refused."""
    assert OnDemandPolicy.decode_runs and not MRUProbe.decode_runs
    assert not MRUProbe(get_model("mixtral-8x7b"), {}).plans_decode_runs

    class Redeclared(OnDemandPolicy):
        decode_runs = True

        def evict_key(self, batch):
            return self.last_used

    class Bookkeeping(OnDemandPolicy):      # overrides nothing the runs assume
        def on_finish(self, req, now):
            pass
    assert Redeclared.decode_runs and Bookkeeping.decode_runs
    with pytest.raises(TypeError, match="declare `decode_runs"):
        class Sneaky(ExpertPolicy):
            @property
            def plans_decode_runs(self):
                return True


def scenario(policy, scheduler="fcfs", **limits):
    return load_scenario(data={
        "name": "ff", "model": "mixtral-8x7b", "hardware": {"preset": "a100-40gb", "count": 4},
        "workload": {"trace": str(SAMPLE), "requests": 40, "arrival": {"process": "poisson", "rate": 0.1},
                     "slo": {"default": {"ttft_s": 5.0, "e2e_s": 60.0}}},
        "policy": policy, "scheduler": {"name": scheduler},
        "limits": {"max_batch_tokens": 1024, "max_running": 8, **limits}})



ENGINE_CASES = [(spec, "fcfs", {}) for spec in registry_specs()] + [
    ({"name": "on_demand", "capacity": 0.4}, "emoe", {}),
    ({"name": "resident"}, "sjf", {}),
    ({"name": "on_demand", "capacity": 0.5}, "fcfs", {"max_steps": 3000}),
    ({"name": "on_demand", "capacity": 0.5}, "edf", {"max_sim_time_s": 40.0}),
    ({"name": "emoe", "capacity": 0.5, "interval": 4}, "emoe", {}),
    ({"name": "mru_probe", "capacity": 0.6}, "fcfs", {}),
    ({"name": "on_demand", "capacity": 0.5, "eviction": "lfu"}, "fcfs", {}),
    ({"name": "on_demand", "capacity": 0.25, "eviction": "lfu"}, "fcfs", {"max_steps": 3000}),
    ({"name": "on_demand", "capacity": 0.75, "eviction": "lfu"}, "edf", {"max_sim_time_s": 40.0}),
]


@pytest.mark.parametrize("policy,scheduler,limits", ENGINE_CASES,
                         ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x))
def test_engine_results_identical_with_and_without_decode_runs(monkeypatch, policy, scheduler, limits):
    """Every registered policy in each miss mode (and an MRU subclass probe): decode runs are
    taken exactly where the class declares them and its state allows, and change nothing."""
    monkeypatch.setitem(POLICIES, MRUProbe.name, MRUProbe)
    sc = scenario(policy, scheduler, **limits)
    runs, ready = [], []
    real = Engine._decode_run

    def counting(self, now):
        if len(self.running) == 1 and not self.n_waiting:
            ready.append(self.policy.plans_decode_runs)
        r = real(self, now)
        runs.append(r[1] if r else 0)
        return r
    monkeypatch.setattr(Engine, "_decode_run", counting)
    fast = run_scenario(sc)
    if not POLICIES[policy["name"]].decode_runs:
        # Never the fast path: its results are stepping's by construction (one code path).
        assert sum(runs) == 0, "a policy that does not declare decode runs took the fast path"
        if policy["name"] == MRUProbe.name:   # and the probe is not LRU in disguise
            lru = run_scenario(scenario({**policy, "name": "on_demand"}, scheduler, **limits))
            assert fast.summary["misses"] != lru.summary["misses"]
        return
    if any(ready):
        assert sum(runs) >= 100, "the light-load path was not taken"
        assert max(runs) < max(fast.requests.output_tokens), "runs are never cut by arrivals"
    slow = run_scenario(scenario(policy, scheduler, **limits, decode_runs=False))
    assert slow.summary["engine_steps"] == fast.summary["engine_steps"]
    pd.testing.assert_frame_equal(fast.requests, slow.requests, rtol=1e-12)
    pd.testing.assert_frame_equal(fast.timeline, slow.timeline, rtol=1e-12)
    assert fast.summary.keys() == slow.summary.keys()
    for k, v in slow.summary.items():
        if isinstance(v, (int, float)):
            assert fast.summary[k] == pytest.approx(v, rel=1e-12), k
        else:   # labels (e.g. the quality estimate's source) and per-task dicts
            assert fast.summary[k] == v, k


def test_lru_runs_only_where_they_pay():
    assert make_policy({"name": "on_demand"}, get_model("olmoe-1b-7b")).plans_decode_runs        # 64 experts
    assert not make_policy({"name": "on_demand"}, get_model("qwen3-30b-a3b")).plans_decode_runs  # 128 experts
    assert make_policy({"name": "on_demand", "miss": "reroute"}, get_model("qwen3-30b-a3b")).plans_decode_runs


PREFETCHING = [{"name": "pregated"}, {"name": "pregated", "recall": 0.8}, {"name": "pregated", "miss": "reroute"},
               {"name": "oracle"}, {"name": "oracle", "miss": "reroute"}, {"name": "moe_infinity"},
               {"name": "moe_infinity", "prefetch_per_step": 4}, {"name": "moe_infinity", "miss": "reroute"}]


@pytest.mark.parametrize("spec", PREFETCHING, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_max_decode_loads_bounds_the_copies_of_prefetching_policies(spec):
    """The engine cuts a decode run by max_decode_loads copies per step: a single-token step
    of a prefetching policy (its prefetches and its misses) never issues more."""
    from traces.format import load_trace
    trace = load_trace(SAMPLE)
    m = get_model("mixtral-8x7b")
    pol = make_policy({**spec, "capacity": 0.25}, m, trace, 0)
    req = Request(index=0, rid=str(trace.request_id[0]), task=str(trace.task[0]), prompt_tokens=1,
                  output_tokens=int(trace.n_tokens) - 1, row0=0, arrival_s=0.0, slo={}, expected_output=8.0)
    pol.on_admit(req, 0.0)
    most = 0
    for row in range(300):
        req.prefilled, req.generated = 1, row          # next_row: this step's row
        b = StepBatch(step=row, experts=trace.experts[row:row + 1], gates=trace.gates[row:row + 1], probs=None,
                      token_req=np.zeros(1, dtype=np.int64), requests=[req])
        most = max(most, pol.plan_step(b).copies)
        if row % 50 == 49:                             # finished requests feed moe_infinity's library
            pol.on_finish(req, 0.0)
            pol.on_admit(req, 0.0)
    assert 0 < most <= pol.max_decode_loads


# (capacity, rematch_every, the share of steps in runs at least): with 2 slots a layer the
# predicted pair is evicted by nearly every step's misses (each step then prefetches again);
# with 4, a predicted expert tied in score with another is evicted by the LRU tie-break, and
# copied back the next step.
@pytest.mark.parametrize("capacity,every,in_runs_share", [(0.6, 16, 0.8), (0.25, 4, 0.0), (0.5, 64, 0.4)])
def test_moe_infinity_decode_runs_plan_the_steps_between_its_prefetches(capacity, every, in_runs_share):
    """MoE-Infinity's runs, from a state with a library of finished requests: each run plans
    the steps up to the first one that prefetches, with stepping's misses, residency, EAMs,
    predictions and scores; that step is then stepped."""
    from traces.format import load_trace
    trace = load_trace(SAMPLE)
    m = get_model("mixtral-8x7b")
    pol = make_policy({"name": "moe_infinity", "capacity": capacity, "rematch_every": every}, m, trace, 0)

    def step(p, req, n=1):
        r = req.next_row
        plan = p.plan_step(StepBatch(step=0, experts=trace.experts[r:r + n], gates=trace.gates[r:r + n],
                                     probs=None, token_req=np.zeros(n, dtype=np.int64), requests=[req]))
        req.generated += 1
        return plan

    for i in range(4):                                  # finished requests fill the library
        done = Request(index=i, rid=f"d{i}", task="qa", prompt_tokens=1, output_tokens=60, row0=100 * i,
                       arrival_s=0.0, slo={}, expected_output=8.0)
        done.prefilled = 1
        pol.on_admit(done, 0.0)
        for _ in range(59):
            step(pol, done)
        pol.on_finish(done, 0.0)
    req = Request(index=9, rid="r", task="qa", prompt_tokens=1, output_tokens=400, row0=500, arrival_s=0.0,
                  slo={}, expected_output=8.0)
    req.prefilled = 1
    pol.on_admit(req, 0.0)
    ref, req_ref = copy.deepcopy(pol), copy.deepcopy(req)
    in_runs = stepped = 0
    while req.generated < 390:
        r, n = req.next_row, 390 - req.generated
        run = pol.plan_decode_run(StepBatch(step=0, experts=trace.experts[r:r + n], gates=trace.gates[r:r + n],
                                            probs=None, token_req=np.zeros(n, dtype=np.int64), requests=[req]))
        if run is None:                                 # the engine steps: the same on both sides
            plan = step(pol, req)
            assert step(ref, req_ref).prefetch == plan.prefetch
            stepped += 1
            continue
        T = len(run.counts)
        for t in range(T):
            plan = step(ref, req_ref)
            assert not plan.prefetch
            np.testing.assert_array_equal(run.demand[t], plan.demand)
            assert run.resident[t] == ref.resident.sum()
        req.generated += T
        in_runs += T
        if req.generated < 390:                         # a run ends before a step that prefetches
            r = req_ref.next_row
            probe = copy.deepcopy(ref)
            assert probe.plan_step(StepBatch(step=0, experts=trace.experts[r:r + 1], gates=trace.gates[r:r + 1],
                                             probs=None, token_req=np.zeros(1, dtype=np.int64),
                                             requests=[req_ref])).prefetch or T == n
        np.testing.assert_array_equal(pol.resident, ref.resident)
        np.testing.assert_array_equal(pol.score, ref.score)
        np.testing.assert_array_equal(pol.eam[9], ref.eam[9])
        np.testing.assert_array_equal(pol.pred[9], ref.pred[9])
        np.testing.assert_array_equal(pol.last_used, ref.last_used)
        assert (pol.seen[9], pol.clock) == (ref.seen[9], ref.clock)
        for name in ("hits", "misses", "loads", "ahead_loads", "routes"):
            assert getattr(pol.accounting, name) == getattr(ref.accounting, name), name
    assert in_runs >= in_runs_share * (in_runs + stepped), (in_runs, stepped)
    assert ref.accounting.ahead_loads + ref.accounting.misses > 0
