"""The eMoE policy, scheduler, predictors and task identification."""
import numpy as np
import pytest

from sim.policies import make_policy
from sim.predictors import load_predictor, make_predictor
from sim.predictors.evaluate import evaluate, split_requests
from sim.request import Request
from sim.run import run_scenario
from sim.schedulers.emoe import EmoeScheduler
from sim.taskid import TaskIdentifier, classify
from simhelpers import tiny_scenario
from traces.model_shape import get_model
from traces.stats import request_counts, token_mask
from traces.synth import synthesize

TINY = get_model("tiny")


def req(i, task, prompt=10, out=10, arrival=0.0, slo=None, expected=10.0):
    return Request(index=i, rid=f"r{i}", task=task, prompt_tokens=prompt, output_tokens=out, row0=0,
                   arrival_s=arrival, slo=slo or {}, expected_output=expected)


# ---- task identification -------------------------------------------------------------
def test_keyword_classifier():
    assert classify("Summarize the dialogue: #Person1#: hi") == "summarization"
    assert classify("def add(a, b):\n    return a + b") == "code"
    assert classify("Janet has 3 eggs each day. How many eggs in total?") == "math"
    assert classify("who wrote the odyssey") == "qa"
    assert classify("zzz") is None


def test_misidentification_rate():
    ti = TaskIdentifier(["qa", "code", "math"], misid_rate=0.3, seed=0)
    wrong = np.mean([ti.identify("qa") != "qa" for _ in range(2000)])
    assert wrong == pytest.approx(0.3, abs=0.04)
    assert TaskIdentifier(["qa", "code"]).identify("qa") == "qa"


# ---- predictors ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_trace():
    return synthesize("tiny", ["qa", "code"], 120, seed=2, profile="paper")


@pytest.mark.parametrize("kind", ["frequency", "emoe_a", "emoe_l", "mlp"])
def test_predictor_round_trip_and_eval(tmp_path, paper_trace, kind):
    tr_idx, ev_idx = split_requests(paper_trace, 0.25, seed=0)
    assert not set(tr_idx) & set(ev_idx) and len(tr_idx) + len(ev_idx) == paper_trace.n_requests
    p = make_predictor(kind).fit(paper_trace, tr_idx)
    q = load_predictor(p.save(tmp_path / "p.npz"))
    hist = [request_counts(paper_trace, token_mask(paper_trace))[0]]
    np.testing.assert_allclose(p.predict("qa", hist), q.predict("qa", hist))
    f = q.predict("code", hist)
    assert f.shape == (4, 8) and np.allclose(f.sum(axis=1), 1)
    df = evaluate(q, paper_trace, ev_idx)
    assert set(df.request) == set(ev_idx.tolist())
    assert 0 < df.f1.mean() <= 1 and 0 < df.coverage.mean() <= 1


def test_evaluation_never_trains_on_evaluated_requests(paper_trace):
    tr_idx, ev_idx = split_requests(paper_trace, 0.25, seed=0)
    p = make_predictor("frequency").fit(paper_trace, tr_idx)
    # Fitting ignores the held-out requests: scrambling their routing changes nothing.
    scrambled = paper_trace.subset(np.arange(paper_trace.n_requests))
    for i in ev_idx:
        sl = scrambled.token_slice(i)
        scrambled.experts[sl] = (scrambled.experts[sl] + 3) % 8
    p2 = make_predictor("frequency").fit(scrambled, tr_idx)
    for t in p.prior:
        np.testing.assert_allclose(p.prior[t], p2.prior[t])
    with pytest.raises(ValueError, match="were used to train"):
        evaluate(p, paper_trace, tr_idx[:3])


def test_recurrence_helps_emoe_a_over_frequency():
    t = synthesize("mixtral-8x7b", ["code", "math"], 240, seed=3, profile="paper")
    tr_idx, ev_idx = split_requests(t, 0.25, seed=1)
    f1 = {k: evaluate(make_predictor(k).fit(t, tr_idx), t, ev_idx).f1.mean() for k in ("frequency", "emoe_a")}
    assert f1["emoe_a"] > f1["frequency"]


# ---- the policy --------------------------------------------------------------------------
def test_perfect_predictor_p1_loads_the_oracle_set(tiny_trace_path):
    from traces.format import load_trace
    t = load_trace(tiny_trace_path)
    pol = make_policy({"name": "emoe", "capacity": 0.5, "interval": 1, "predictor": "perfect", "skip": False},
                      TINY, t, 0)
    r = req(5, str(t.task[5]))
    pol.on_arrival(r, 0.0)
    pol.invoke()
    counts = request_counts(t, token_mask(t))[5]
    for layer in range(TINY.n_moe_layers):
        best = set(np.argsort(-counts[layer], kind="stable")[:4].tolist())
        assert set(np.flatnonzero(pol.resident[layer]).tolist()) == best


def test_expected_tokens_order_on_a_hand_made_case():
    # p = 3 prompts: the window is exactly the three arrivals, so N is their expected tokens.
    pol = make_policy({"name": "emoe", "capacity": 0.25, "skip": False, "interval": 3}, TINY, None, 0)
    f = {"qa": np.tile([0.5, 0.3, 0.2, 0, 0, 0, 0, 0], (4, 1)),
         "code": np.tile([0, 0, 0.1, 0.9, 0, 0, 0, 0], (4, 1))}
    pol.predictor.prior = f
    # qa: 2 requests x (prompt 10 + expected 5) = 30 tokens; code: 1 x (100 + 100) = 200.
    for i, (task, p, e) in enumerate([("qa", 10, 5.0), ("qa", 10, 5.0), ("code", 100, 100.0)]):
        pol.on_arrival(req(i, task, prompt=p, expected=e), 0.0)
    N = pol.expected_tokens()
    np.testing.assert_allclose(N[0, :4], [15, 9, 6 + 20, 180])
    assert np.argsort(-N[0])[:2].tolist() == [3, 2]
    pol.invoke()
    assert set(np.flatnonzero(pol.resident[0])) == {2, 3}


def test_skip_removes_an_insensitive_tasks_demand():
    sens = {"default": 1.0, "tasks": {"classification": 0.0, "qa": 0.5}}
    pol = make_policy({"name": "emoe", "capacity": 0.25, "sensitivity": sens}, TINY, None, 0)
    pol.predictor.prior = {"classification": np.full((4, 8), 1 / 8), "qa": np.full((4, 8), 1 / 8)}
    pol.on_arrival(req(0, "classification", prompt=50), 0.0)
    assert pol.expected_tokens().sum() == 0            # insensitive everywhere: no demand
    pol.on_arrival(req(1, "qa", prompt=50), 0.0)
    N = pol.expected_tokens()
    assert (N[:2] == 0).all() and (N[2:] > 0).all()    # qa: input half skipped
    no_skip = make_policy({"name": "emoe", "capacity": 0.25, "sensitivity": sens, "skip": False}, TINY, None, 0)
    no_skip.predictor.prior = pol.predictor.prior
    no_skip.on_arrival(req(0, "classification", prompt=50), 0.0)
    assert no_skip.expected_tokens().sum() > 0


def test_interval_controls_invocations(tiny_trace_path):
    runs = {p: run_scenario(tiny_scenario(tiny_trace_path, {"name": "emoe", "capacity": 0.5, "interval": p}))
            for p in (1, 10)}
    inv = {p: r.summary["predictor_invocations"] for p, r in runs.items()}
    assert inv[1] > 3 * inv[10] >= 3
    for r in runs.values():
        assert r.requests.completed.all()
        assert r.summary["routing_fidelity"] < 1.0 and r.summary["peak_predictor_bytes"] > 0


def test_every_policy_is_judged_by_the_scenarios_sensitivity_table(tiny_trace_path):
    """eMoE's own `sensitivity` steers its skip rule only; routing_fidelity_sensitive is judged by
    one table for every policy (the shipped one, or quality.sensitivity): judged by a table where
    every layer is sensitive, it equals routing_fidelity, eMoE's own table notwithstanding."""
    from sim.run import build
    from sim.sensitivity import DEFAULT
    own = {"default": 0.25}
    for policy in ({"name": "emoe", "capacity": 0.5, "sensitivity": own}, {"name": "random", "capacity": 0.5}):
        pol = build(tiny_scenario(tiny_trace_path, policy)).policy
        assert pol.accounting.sensitivity.source == str(DEFAULT)
        if policy["name"] == "emoe":
            assert pol.sens.source == "policy.sensitivity"
        r = run_scenario(tiny_scenario(tiny_trace_path, policy, quality={"sensitivity": {"default": 1.0}}))
        assert r.summary["routing_fidelity"] < 1.0
        assert r.summary["routing_fidelity_sensitive"] == pytest.approx(r.summary["routing_fidelity"], rel=1e-6)


def test_adaptive_per_layer_spends_the_same_budget():
    pol = make_policy({"name": "emoe", "capacity": 0.5, "per_layer": "adaptive", "skip": False}, TINY, None, 0)
    N = np.ones((4, 8))
    N[0, 0] = 100        # layer 0 concentrated: needs few experts
    target = pol.choose(N)
    assert target.sum() == pol.capacity.sum()
    assert (target.sum(axis=1) >= TINY.top_k).all()
    assert target[0].sum() < target[1:].sum(axis=1).max()



def test_adaptive_per_layer_never_holds_more_than_the_uniform_budget():
    """With the skip rule on, layers no sensitive task needs keep their experts; the layers
    reallocated share what is left of the same slots (also under miss: fetch, where each
    layer's misses are fetched into its own share)."""
    pol = make_policy({"name": "emoe", "capacity": 0.5, "per_layer": "adaptive", "skip": False}, TINY, None, 0)
    slots = int(pol.capacity.sum())
    pol.resident[:] = False
    pol.resident[0, :6] = True                 # a layer an earlier choice gave 6 of its 8 experts
    N = np.ones((4, 8))
    N[0] = 0                                   # ... now needed by no sensitive task: it keeps them
    N[1, 0] = 100
    target = pol.choose(N)
    assert target[0].sum() == 6 and target.sum() == slots
    assert (pol.capacity == target.sum(axis=1)).all() and pol.cache_experts == slots


@pytest.mark.parametrize("miss", ["reroute", "fetch"])
def test_adaptive_per_layer_holds_the_budget_through_a_run(monkeypatch, miss):
    """The paper's task mix at interval 1: every choice's set, and the memory ledger's experts
    at every step, stay within the uniform slots (plus top_k staging)."""
    from sim.scenario import load_scenario
    import sim.policies.emoe as emoe
    held = []
    choose = emoe.EmoePolicy.choose

    def watched(self, N):
        target = choose(self, N)
        held.append((int(target.sum()), self.cache_experts))
        return target
    monkeypatch.setattr(emoe.EmoePolicy, "choose", watched)
    sc = load_scenario("scenarios/paper/base-mixtral-paper-tasks.yaml",
                       ["workload.requests=30", "workload.arrival={process: poisson, rate: 1.0}",
                        "policy={name: emoe, capacity: 0.5, interval: 1, per_layer: adaptive, miss: " + miss + "}"])
    r = run_scenario(sc)
    slots = held[0][1]
    assert len(held) > 10 and all(n <= s for n, s in held) and all(s == slots for _, s in held)
    m = get_model("mixtral-8x7b")
    assert r.timeline.mem_experts.max() <= (slots + m.top_k) * m.bytes_per_expert


# ---- the scheduler (Algorithm 1) ----------------------------------------------------------
def test_algorithm1_never_breaks_a_running_slo_under_its_estimate():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = EmoeScheduler({"per_token_s": float(rng.uniform(0.01, 0.1))})
        now = float(rng.uniform(0, 20))
        running = []
        for i in range(int(rng.integers(1, 6))):
            r = req(i, "qa", prompt=int(rng.integers(5, 200)), arrival=now - float(rng.uniform(0, 10)),
                    slo={"e2e_s": float(rng.uniform(5, 60))}, expected=float(rng.integers(5, 300)))
            running.append(r)
        waiting = [req(10 + j, "code", prompt=int(rng.integers(5, 500)), arrival=now,
                       slo={"e2e_s": 100.0}, expected=50.0) for j in range(4)]
        admitted = s.select(waiting, running, now, lambda r: True)
        batch = running + admitted
        for r in admitted:
            others = running + admitted[:admitted.index(r)]
            view = s.batch_view(others, now, s.expert_load_s())
            with_r, _ = s.with_request(view, r, now)
            # Every running request that could still meet its SLO still meets it with r
            # (one that could not anyway is not protected: it would only block others).
            assert ((view["own"] > view["slo"]) | (with_r <= view["slo"] + 1e-9)).all()
        assert len(batch) >= len(running)


def test_algorithm1_admits_when_slack_and_orders_by_stringency():
    s = EmoeScheduler({"per_token_s": 0.01})
    running = [req(0, "qa", arrival=0.0, slo={"e2e_s": 1000.0}, expected=10)]
    a = req(1, "qa", prompt=10, arrival=1.0, slo={"ttft_s": 9.0, "e2e_s": 50})
    b = req(2, "qa", prompt=10, arrival=0.5, slo={"ttft_s": 1.0, "e2e_s": 50})
    # The engine keeps the waiting queue in key order: the most stringent SLO first.
    queue = sorted([a, b], key=lambda r: s.key(r, 2.0))
    assert queue == [b, a]
    assert s.select(queue, running, 2.0, lambda r: True) == [b, a]
    # Its 10-token prompt and 10 steps at 0.01 s end at 2.2 s, in time; R's 500-token prompt (5 s) would not.
    tight = [req(0, "qa", arrival=0.0, slo={"e2e_s": 2.25}, expected=10)]
    assert s.select([req(3, "qa", prompt=500, arrival=1.0)], tight, 2.0, lambda r: True) == []
