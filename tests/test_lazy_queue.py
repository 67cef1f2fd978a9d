"""The lazy queue: first come first served, an arrival is a count until admission reaches it.

What a user relies on: the results are those of a queue of built requests, and a million
requests arriving at once do not become a million Requests in memory."""
import pandas as pd
import pytest

from sim.engine import Engine
from sim.run import run_scenario
from sim.workload import Arrivals
from tests.test_batch_run import LRU, scenario

SMALL_CACHE = {"name": "on_demand", "capacity": 0.25}
CASES = [
    ("all at t=0", LRU, None, None, {}),
    ("poisson", LRU, {"process": "poisson", "rate": 1.0}, None, {}),
    ("stepped", LRU, {"process": "poisson", "rate": 2.0}, None, {"decode_runs": False}),
    ("KV runs out: preemptions re-queued ahead of the count", LRU, None, {"memory_bytes": 13.8e9},
     {"max_running": 32}),
    ("prompts that never fit are refused as admission reaches them", SMALL_CACHE, {"process": "poisson", "rate": 4.0},
     {"memory_bytes": 7.4e9}, {"max_running": 32}),
    ("max_steps: the unbuilt tail is tabled", LRU, None, None, {"max_steps": 300}),
    ("max_sim_time_s with arrivals to come", LRU, {"process": "poisson", "rate": 0.5}, None,
     {"max_sim_time_s": 40.0}),
    ("resident", {"name": "resident"}, {"process": "poisson", "rate": 3.0}, None, {}),
]


@pytest.mark.parametrize("name,policy,arrival,hardware,limits", CASES, ids=[c[0] for c in CASES])
def test_lazy_queue_gives_the_built_queues_results(monkeypatch, name, policy, arrival, hardware, limits):
    """Request table, timeline (its `waiting` column too) and summary are exactly those of a
    queue that builds each request as it arrives."""
    built = []
    real = Engine._admit

    def watching(self, now):
        real(self, now)
        built.append((len(self.waiting), self.n_waiting, self._lazy_times is not None))
    monkeypatch.setattr(Engine, "_admit", watching)
    lazy = run_scenario(scenario(policy, arrival=arrival, hardware=hardware, **limits))
    assert all(on for *_, on in built), "the lazy queue was not used"
    lazy_built = list(built)
    with monkeypatch.context() as m:
        m.delattr(Arrivals, "times_in_order")      # the engine then builds every arrival
        built_queue = run_scenario(scenario(policy, arrival=arrival, hardware=hardware, **limits))
    assert lazy.summary["engine_steps"] == built_queue.summary["engine_steps"]
    pd.testing.assert_frame_equal(lazy.requests, built_queue.requests, check_exact=True)
    pd.testing.assert_frame_equal(lazy.timeline, built_queue.timeline, check_exact=True)
    assert lazy.summary == built_queue.summary
    if name.startswith("all at t=0"):
        # 60 waiting at the start, at most one more built than the 8 free slots
        assert max(n for _, n, _ in lazy_built) == 52 and max(b for b, _, _ in lazy_built) <= 9
    if name.startswith("KV runs out"):
        assert lazy.summary["preemptions"] > 0
    if name.startswith("prompts that never fit"):
        assert 0 < lazy.summary["requests_rejected"] < 60
    if name.startswith("max_"):
        assert lazy.summary["requests_completed"] < 60 and len(lazy.requests) == 60


EMOE = {"name": "emoe", "capacity": 0.5}


@pytest.mark.parametrize("policy,sched,lazy", [(LRU, "fcfs", True), (LRU, "sjf", False), (LRU, "edf", False),
                                               (LRU, "emoe", False), (EMOE, "fcfs", False)],
                         ids=["fcfs", "sjf", "edf", "emoe scheduler", "emoe policy"])
def test_who_gets_the_lazy_queue(monkeypatch, policy, sched, lazy):
    """Schedulers that reorder the queue or select by their own rule, and a policy that sees
    each arrival (the eMoE policy counts and labels them), get built requests."""
    seen = []
    real = Engine.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        seen.append(self._lazy_times is not None)
    monkeypatch.setattr(Engine, "__init__", init)
    run_scenario(scenario(policy, sched, max_steps=20))
    assert seen == [lazy]


@pytest.mark.parametrize("arrival_s", [[0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.2, 0.5], [0.3, 0.1, 0.3, 0.0]],
                         ids=["all at once", "in order", "out of order"])
def test_arrivals_come_in_time_order_ties_by_index(arrival_s):
    """Requests are built in arrival order, ties by workload index; arrivals already in that
    order (all at once, Poisson) need no index array of their own."""
    import numpy as np
    a = Arrivals.__new__(Arrivals)
    a.arrival_s = np.array(arrival_s)
    a.trace = type("T", (), {"n_requests": len(arrival_s)})()
    want = sorted(range(len(arrival_s)), key=lambda i: (arrival_s[i], i))
    assert list(a._order) == want
    assert a.times_in_order().tolist() == sorted(arrival_s)
    assert isinstance(a._order, range) is (want == list(range(len(arrival_s))))
