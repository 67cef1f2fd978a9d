"""Synthetic traces generated as they are read (traces/lazy_trace.py): the same rows as
synthesize's, the same simulation results, and only the chunks of in-flight requests held."""
from pathlib import Path

import numpy as np
import pytest

from sim.run import run_scenario
from sim.scenario import load_scenario
from sim.workload import load_workload_trace
from traces.lazy_trace import lazy_synthesize, materialise
from traces.model_shape import get_model
from traces.profile import resolve_profile
from traces.synth import RoutingModel, synthesize

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"wall_time_s", "engine_steps_per_s"}
SMALL = dict(prompt_mean=40, output_mean=20, chunk_tokens=600)   # ~18k tokens in ~30 chunks


def _pair(profile, n=300, **kw):
    """synthesize's trace and the lazy one, of the same arguments (cache_bytes=1: one chunk held)."""
    tasks = ["qa", "code", "math"]
    routing = RoutingModel(get_model("mixtral-8x7b"), tasks, resolve_profile(profile))   # calibrated once: slow
    kw = dict(SMALL, seed=5, profile=profile, routing_model=routing, **kw)
    return (synthesize("mixtral-8x7b", tasks, n, **kw),
            lazy_synthesize("mixtral-8x7b", tasks, n, cache_bytes=1, **kw))


@pytest.mark.parametrize("profile", ["real", "paper"])
def test_every_row_is_synthesizes(profile):
    eager, lazy = _pair(profile, router_probs=True)
    assert lazy.source.n_chunks >= 10
    assert lazy.experts.shape == eager.experts.shape and lazy.gates.dtype == eager.gates.dtype
    assert len(lazy.router_probs) == eager.n_tokens and lazy.router_probs.ndim == 3
    rows = np.random.default_rng(0).permutation(eager.n_tokens)   # any order: chunks are regenerated
    assert np.array_equal(lazy.experts[rows], eager.experts[rows])
    lazy.source.cache_bytes = 1 << 40
    for name in ("experts", "gates", "router_probs"):
        a, b = getattr(eager, name), getattr(lazy, name)
        assert np.array_equal(np.asarray(b), a), name
        assert b[rows[:50]].dtype == a.dtype
    for f in ("request_id", "task", "prompt_tokens", "output_tokens"):
        assert np.array_equal(getattr(lazy, f), getattr(eager, f))
    assert lazy.extra == eager.extra and lazy.arrival_s is None
    assert lazy.source.generated > lazy.source.n_chunks   # cache_bytes=1 forced regenerations


def test_reads_like_an_ndarray():
    eager, lazy = _pair("real", n=120)
    e, x = eager.experts, lazy.experts
    n = eager.n_tokens
    for key in (5, -1, np.int64(7), slice(None), slice(3, 900), slice(10, 2000, 7), slice(50, 10),
                np.array([[1, 2, 3], [n - 1, 0, 400]]), np.arange(n) % 3 == 0, (slice(100, 700), 0),
                (np.array([4, 1500]), slice(None), 1), (9, 2)):
        assert np.array_equal(x[key], e[key]), key
    rows = np.arange(40, 90)
    oracle_rows = np.minimum(rows[:, None] + 1 + np.arange(8)[None, :], n - 1)   # the oracle's look-ahead
    assert np.array_equal(x[oracle_rows], e[oracle_rows])
    with pytest.raises(IndexError):
        x[n]
    with pytest.raises(IndexError):
        x[np.array([0, n])]


def test_first_requests_generate_no_more():
    args = ("mixtral-8x7b", ["qa", "code"], 300)
    full = synthesize(*args, seed=2, profile="paper", **SMALL)
    lazy = lazy_synthesize(*args, first=40, seed=2, profile="paper", **SMALL)
    part = full.subset(np.arange(40))
    assert lazy.n_requests == 40 and lazy.n_tokens == part.n_tokens
    assert np.array_equal(lazy.experts[:], part.experts) and np.array_equal(lazy.gates[:], part.gates)
    assert np.array_equal(lazy.request_id, part.request_id)
    assert lazy.source.n_chunks < 10 and lazy.source.generated == lazy.source.n_chunks


def test_rate_arrivals_are_synthesizes():
    eager, lazy = _pair("paper", n=100, rate=3.0)
    assert np.array_equal(lazy.arrival_s, eager.arrival_s)
    assert np.array_equal(lazy.experts[::-1], eager.experts[::-1])
    first = lazy_synthesize("mixtral-8x7b", ["qa", "code", "math"], 100, first=30, seed=5, profile="paper",
                            rate=3.0, **SMALL)
    assert np.array_equal(first.arrival_s, eager.arrival_s[:30])
    assert np.array_equal(first.gates[:], eager.subset(np.arange(30)).gates)


def test_release_drops_chunks_and_rows_stay_right():
    eager, lazy = _pair("paper", n=100)
    lazy.source.cache_bytes = 1 << 40
    src = lazy.source
    lazy.experts[-1]                              # generates (and holds) every chunk
    assert len(src.cached) == src.n_chunks
    for r in range(50):
        lazy.release(r)
    assert min(src.cached) == int(src.chunk_of(eager.offsets[50]))   # chunks of released requests dropped
    assert np.array_equal(lazy.experts[:], eager.experts)          # a dropped chunk read again: regenerated


def _summary(sc, trace=None):
    s = run_scenario(sc, trace=trace).summary
    return {k: v for k, v in s.items() if k not in VOLATILE}


@pytest.mark.parametrize("name, over", [
    ("base-throughput.yaml", ["workload.synthetic.requests=24", "workload.synthetic.prompt_mean=300",
                              "workload.synthetic.output_mean=40", "policy.name=oracle"]),
    ("base-mixtral-8x22b.yaml", ["workload.synthetic.requests=30", "workload.requests=20",
                                 "workload.synthetic.prompt_mean=200", "workload.arrival.rate=2.0"]),
    ("base-mixtral-8x22b.yaml", ["workload.synthetic.requests=30", "workload.tasks=[qa,summarization]",
                                 "workload.synthetic.output_mean=50", "workload.arrival.rate=2.0",
                                 "policy.name=emoe"]),
])
def test_shipped_synthetic_scenarios_same_summary(name, over):
    sc = load_scenario(ROOT / "scenarios" / "paper" / name, over)
    lazy = load_workload_trace(sc, get_model(sc["model"]))
    eager = load_workload_trace(sc, get_model(sc["model"]), lazy=False)
    assert (lazy.source is not None) == (sc["workload"]["tasks"] is None)
    assert _summary(sc, eager) == _summary(sc)


def test_saturated_run_holds_few_chunks():
    data = {"name": "lazy", "seed": 3, "model": "mixtral-8x7b", "hardware": {"preset": "a100-40gb", "count": 4},
            "workload": {"synthetic": {"tasks": ["qa", "code"], "requests": 200, "prompt_mean": 60,
                                       "output_mean": 30, "seed": 4},
                         "arrival": {"process": "batch"}},
            "policy": {"name": "on_demand"}, "limits": {"max_batch_tokens": 512, "max_running": 8}}
    sc = load_scenario(data=data)
    syn = dict(sc["workload"]["synthetic"])
    args = (get_model(sc["model"]), syn.pop("tasks"), syn.pop("requests"))
    lazy = lazy_synthesize(*args, chunk_tokens=800, **syn)
    src = lazy.source
    assert src.n_chunks >= 10
    assert _summary(sc, lazy) == _summary(sc, synthesize(*args, chunk_tokens=800, **syn))
    # FCFS admits in order: the chunks of the 8 running requests (and a straggler) are held, no more
    assert src.peak_cached <= 4 < src.n_chunks // 3 and src.cached == []
    assert src.generated == src.n_chunks
    assert materialise(lazy).source is None
