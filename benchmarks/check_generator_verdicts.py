"""Decision-level check of the fitted generator: do policies rank the same on synthetic
routing as on the real routing it was fitted to?

    python benchmarks/check_generator_verdicts.py [--trace traces/samples/emoe-small-moe-captured.npz]
        [--capacities 0.25,0.5,0.75] [--seeds 3] [--rate 20] [--rounds 25] [--json OUT]

1. Split the real trace's requests in two halves, alternately within each task.
2. Fit a profile on the first half (`emoe trace fit`).
3. Synthesise the held-out half's shape (its tasks and lengths) with that profile,
   once per seed.
4. Simulate every policy at every capacity on the held-out real requests and on each
   synthetic trace (the scenario of scenarios/emoe-small-moe.yaml, Poisson arrivals),
   and compare: hit rate per policy (synthetic: mean over seeds), the rankings by
   hit rate and by mean end-to-end latency, and `trace compare` of the statistics.

A swap between two policies that either side puts closer than a tie (0.5 points of hit
rate, 1% of latency) is reported apart from a flip (both sides separate them, in
opposite orders). Runs against whatever policies and cost model are in the tree;
README "Synthetic traces and their calibration" holds the table it printed last.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.run import run_scenario
from sim.scenario import load_scenario
from traces.compare import compare, flatten
from traces.fit import fit_profile
from traces.format import load_trace, save_trace
from traces.stats import summary_stats
from traces.synth import synthesize

POLICIES = {
    "on_demand LRU": {"name": "on_demand", "eviction": "lru"},
    "on_demand LFU": {"name": "on_demand", "eviction": "lfu"},
    "moe_infinity": {"name": "moe_infinity"},
    "pregated": {"name": "pregated"},
    "oracle": {"name": "oracle"},
    "random": {"name": "random"},
    "emoe": {"name": "emoe"},
}


def split_halves(t):
    """Alternate requests within each task: (first half, held-out half) as index arrays."""
    train, held = [], []
    for task in t.tasks:
        idx = np.flatnonzero(t.task == task)
        train += idx[0::2].tolist()
        held += idx[1::2].tolist()
    return np.sort(train), np.sort(held)


def scenario(trace_path: Path, policy: dict, rate: float, seed: int) -> dict:
    base = load_scenario(ROOT / "scenarios" / "emoe-small-moe.yaml")
    data = dict(name="verdict-check", seed=seed, model=base["model"], hardware=base["hardware"],
                workload=dict(trace=str(trace_path), arrival=dict(process="poisson", rate=rate)),
                policy=policy, scheduler={"name": "fcfs"}, limits=base["limits"])
    return load_scenario(data=data)


def simulate(trace_path: Path, spec: dict, capacity: float, rate: float, seed: int) -> dict:
    res = run_scenario(scenario(trace_path, dict(spec, capacity=capacity), rate, seed))
    s = res.summary
    return dict(hit_rate=float(s["expert_hit_rate"]), e2e_mean_s=float(s["e2e_mean_s"]))


def ranking(values: dict, reverse: bool) -> list[str]:
    return sorted(values, key=lambda k: values[k], reverse=reverse)


def swapped_pairs(a: list[str], b: list[str]) -> list[tuple[str, str]]:
    pos = {k: i for i, k in enumerate(b)}
    return [(x, y) for i, x in enumerate(a) for y in a[i + 1:] if pos[x] > pos[y]]


# Two policies closer than this are tied: a swap between them is not a different verdict.
TIES = {"hit_rate": 0.005, "e2e_mean_s": 0.01}   # 0.5 points of hit rate; 1% of latency


def flipped(real: dict, syn: dict, metric: str, pairs) -> list[tuple[str, str]]:
    """Swapped pairs that both sides separate by more than a tie, in opposite order."""
    def apart(v, x, y):
        d = abs(v[x] - v[y])
        return d > (TIES[metric] if metric == "hit_rate" else TIES[metric] * max(v[x], v[y]))
    return [(x, y) for x, y in pairs if apart(real, x, y) and apart(syn, x, y)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT / "traces" / "samples" / "emoe-small-moe-captured.npz"))
    ap.add_argument("--capacities", default="0.25,0.5,0.75")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic traces per check")
    ap.add_argument("--rate", type=float, default=20.0, help="Poisson arrivals (req/s)")
    ap.add_argument("--rounds", type=int, default=25, help="fit rounds")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args(argv)
    caps = [float(c) for c in a.capacities.split(",")]
    names = [p.strip() for p in a.policies.split(",")]
    t0 = time.time()
    real = load_trace(a.trace)
    train_idx, held_idx = split_halves(real)
    train, held = real.subset(train_idx), real.subset(held_idx)
    prof = fit_profile(train, tokens="all", rounds=a.rounds, source=Path(a.trace).name)
    print(f"fitted on {train.n_requests} requests in {time.time() - t0:.0f}s "
          f"(rms relative error {prof.fit['rms_relative_error']:.3f}); held out {held.n_requests}")
    tmp = Path(tempfile.mkdtemp(prefix="verdicts-"))
    held_path = save_trace(held, tmp / "held.npz")
    syn_paths = [save_trace(synthesize(None, None, None, seed=100 + s, profile=prof, like=held), tmp / f"syn{s}.npz")
                 for s in range(a.seeds)]

    # Statistics: the synthetic traces (averaged) against the held-out real ones.
    flat = [flatten(summary_stats(load_trace(p), "all")) for p in syn_paths]
    syn_stats = {k: float(np.mean(v)) if np.isfinite(v := [f[k] for f in flat]).any() else float("nan")
                 for k in flat[0]}
    stat_rows = compare(syn_stats, flatten(summary_stats(held, "all")))
    print(f"\nstatistics, synthetic (mean of {a.seeds}) vs held-out real (all tokens):")
    for r in stat_rows:
        print(f"  {r['statistic']:42s}{r['a']:8.3f}{r['b']:8.3f}{r['relative_difference']:+8.0%}  {r['verdict']}")

    results = []
    for cap in caps:
        real_res = {n: simulate(held_path, POLICIES[n], cap, a.rate, 0) for n in names}
        syn_res = {}
        for n in names:
            runs = [simulate(p, POLICIES[n], cap, a.rate, 0) for p in syn_paths]
            syn_res[n] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        row = dict(capacity=cap, real=real_res, synthetic=syn_res)
        for metric, rev in (("hit_rate", True), ("e2e_mean_s", False)):
            rr = ranking({n: real_res[n][metric] for n in names}, rev)
            rs = ranking({n: syn_res[n][metric] for n in names}, rev)
            sw = swapped_pairs(rr, rs)
            row[f"ranking_{metric}"] = dict(real=rr, synthetic=rs, identical=rr == rs, swapped=sw,
                                            flipped=flipped({n: real_res[n][metric] for n in names},
                                                            {n: syn_res[n][metric] for n in names}, metric, sw))
        results.append(row)
        print(f"\ncapacity {cap}: policy, hit rate real / synthetic (points apart), mean e2e real / synthetic (s)")
        for n in names:
            d = 100 * (syn_res[n]["hit_rate"] - real_res[n]["hit_rate"])
            print(f"  {n:15s} {real_res[n]['hit_rate']:7.3f} {syn_res[n]['hit_rate']:7.3f} ({d:+5.1f})"
                  f"   {real_res[n]['e2e_mean_s']:9.4f} {syn_res[n]['e2e_mean_s']:9.4f}")
        for metric in ("hit_rate", "e2e_mean_s"):
            rk = row[f"ranking_{metric}"]
            verdict = "identical" if rk["identical"] else f"swapped {rk['swapped']}; " + (
                f"FLIPPED beyond ties: {rk['flipped']}" if rk["flipped"] else "only within ties (one side < tie)")
            print(f"  ranking by {metric}: {verdict}")
            print(f"    real:      {' > '.join(rk['real'])}")
            if not rk["identical"]:
                print(f"    synthetic: {' > '.join(rk['synthetic'])}")
    worst = max(abs(r["synthetic"][n]["hit_rate"] - r["real"][n]["hit_rate"]) for r in results for n in names)
    print(f"\nlargest hit-rate gap {100 * worst:.1f} points; {time.time() - t0:.0f}s in all")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(fit=prof.fit, statistics=stat_rows, results=results), indent=2,
                                           default=float))
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
