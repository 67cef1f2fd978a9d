"""Benchmark: simulator speed on a Mixtral-8x7B-shape trace (mean 256 output tokens), on_demand policy.

    python benchmarks/bench_sim.py [--requests 1000] [--repeats 3] [--light 200]
    python benchmarks/bench_sim.py --policies [--light 200] [--repeats 3]

- saturated: every request present at t=0, at most 32 running (16-32 in flight); measured with
  batch runs (the default) and step by step in one run;
- light: one request at a time (arrivals far apart), so every step is one token; measured
  with decode runs (the default) and step by step (limits.decode_runs: false) in one run.
- --policies: instead, light-load steps/s of each policy in POLICY_CASES, with decode runs
  and step by step (results asserted the same), as a table.
Prints medians over the repeats; README 'Benchmarks' holds the figures. Runs on one core.
"""
import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

from sim.run import run_scenario
from sim.scenario import load_scenario
from traces.format import load_trace, save_trace
from traces.synth import synthesize

OUT = Path(__file__).parent / "out"


def trace_for(n: int):
    p = OUT / f"mixtral-{n}.npz"
    if not p.exists():
        OUT.mkdir(exist_ok=True)
        save_trace(synthesize("mixtral-8x7b", ["qa", "summarization", "code", "math", "conversation"], n,
                              seed=0, prompt_mean=256, output_mean=256), p)
    return p


def scenario(trace_path, arrival, max_running, policy=None, decode_runs=True):
    return load_scenario(data={
        "name": "bench", "model": "mixtral-8x7b", "hardware": {"preset": "a100-40gb", "count": 4},
        "workload": {"trace": str(trace_path), "arrival": arrival},
        "policy": policy or {"name": "on_demand", "capacity": 0.6},
        "limits": {"max_batch_tokens": 8192, "max_running": max_running, "decode_runs": decode_runs}})


def measure(sc, trace, repeats):
    walls, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run_scenario(sc, trace=trace)
        walls.append(time.perf_counter() - t0)
    w = statistics.median(walls)
    steps = res.summary["engine_steps"]
    return w, steps, res, walls


# --policies: each policy at its default parameters (on_demand: LRU and LFU).
POLICY_CASES = {
    "on_demand (lru)": {"name": "on_demand", "capacity": 0.6},
    "on_demand (lfu)": {"name": "on_demand", "capacity": 0.6, "eviction": "lfu"},
    "pregated": {"name": "pregated"},
    "oracle": {"name": "oracle"},
    "moe_infinity": {"name": "moe_infinity"},
    "emoe": {"name": "emoe", "capacity": 0.6},
    "resident": {"name": "resident"},
}


def same_results(a, b) -> None:
    """Decode runs change nothing: the same steps, and summaries equal to float rounding."""
    assert a.summary["engine_steps"] == b.summary["engine_steps"]
    for k, v in b.summary.items():
        if isinstance(v, (int, float)):
            assert math.isclose(a.summary[k], v, rel_tol=1e-9), k


def bench_policies(path, trace, n_light: int, repeats: int) -> None:
    light = trace.subset(range(n_light))
    arrival = {"process": "poisson", "rate": 0.01}
    print(f"light load, {n_light} requests one at a time; median of {repeats} runs each")
    print(f"{'policy':<18}{'steps':>8}{'decode runs':>14}{'step by step':>14}{'ratio':>8}")
    for label, spec in POLICY_CASES.items():
        w, steps, res, _ = measure(scenario(path, arrival, 32, spec), light, repeats)
        w1, _, res1, _ = measure(scenario(path, arrival, 32, spec, decode_runs=False), light, repeats)
        same_results(res, res1)
        print(f"{label:<18}{steps:>8}{steps / w:>14,.0f}{steps / w1:>14,.0f}{w1 / w:>7.1f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--light", type=int, default=200, help="requests in the light-load run")
    ap.add_argument("--policies", action="store_true", help="light-load steps/s of each policy (a table)")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    if a.policies:
        bench_policies(trace_for(a.requests), load_trace(trace_for(a.requests)), a.light, a.repeats)
        return
    path = trace_for(a.requests)
    trace = load_trace(path)
    sc = scenario(path, {"process": "batch"}, 32)
    w, steps, res, walls = measure(sc, trace, a.repeats)
    print(f"saturated: {a.requests} requests, {steps} steps, median {w:.2f}s wall "
          f"(runs {[round(x, 2) for x in walls]}); "
          f"{steps / w:,.0f} steps/s, {a.requests / w:,.0f} requests/s; mean running "
          f"{res.timeline.batch_requests.mean():.1f}")
    # The same saturated run stepping one SimPy step at a time (no batch runs): same results.
    w1, _, res1, walls1 = measure(scenario(path, {"process": "batch"}, 32, decode_runs=False), trace, a.repeats)
    same_results(res, res1)
    print(f"saturated, step by step: median {w1:.2f}s wall (runs {[round(x, 2) for x in walls1]}); "
          f"{steps / w1:,.0f} steps/s; batch runs are {w1 / w:.1f}x faster, same results")
    light = trace.subset(range(a.light))
    sc = scenario(path, {"process": "poisson", "rate": 0.01}, 32)
    w, steps, res, walls = measure(sc, light, a.repeats)
    print(f"light: {a.light} requests, {steps} steps, median {w:.2f}s wall (runs {[round(x, 2) for x in walls]}); "
          f"{steps / w:,.0f} steps/s, {a.light / w:,.1f} requests/s; mean running "
          f"{res.timeline.batch_requests.mean():.2f}")
    # The same run stepping one SimPy step at a time (no decode runs): same results, for the ratio.
    sc = scenario(path, {"process": "poisson", "rate": 0.01}, 32, decode_runs=False)
    w1, steps1, res1, walls1 = measure(sc, light, a.repeats)
    assert steps1 == steps and res1.summary["e2e_mean_s"] == res.summary["e2e_mean_s"]
    print(f"light, step by step: median {w1:.2f}s wall (runs {[round(x, 2) for x in walls1]}); "
          f"{steps / w1:,.0f} steps/s; decode runs are {w1 / w:.1f}x faster, same results")
    # The eMoE policy (rerouting between invocations, interval 40) at the same light load.
    emoe = {"name": "emoe", "capacity": 0.6}
    sc = scenario(path, {"process": "poisson", "rate": 0.01}, 32, emoe)
    w, steps, res, walls = measure(sc, light, a.repeats)
    sc = scenario(path, {"process": "poisson", "rate": 0.01}, 32, emoe, decode_runs=False)
    w1, _, res1, _ = measure(sc, light, a.repeats)
    print(f"light, emoe: {steps / w:,.0f} steps/s with decode runs, {steps / w1:,.0f} step by step "
          f"({w1 / w:.1f}x)")


if __name__ == "__main__":
    main()
