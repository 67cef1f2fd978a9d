"""Peak memory of a saturated synthetic run, routing generated lazily vs the whole trace.

    python benchmarks/bench_lazy_trace.py [--requests 2000] [--chunk-tokens N]

Each run is a subprocess (peak RSS from getrusage(RUSAGE_CHILDREN)): Mixtral-8x7B on
4 x A100-40GB, batch arrivals, on_demand, max_batch_tokens 8192, max_running 32,
synthetic prompts of mean 512 tokens and outputs of mean 256. The summaries must agree.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from sim.run import run_scenario
from sim.scenario import load_scenario
from sim.workload import load_workload_trace
from traces.lazy_trace import lazy_synthesize
from traces.model_shape import get_model
mode, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sc = load_scenario(data={"name": "lazy-bench", "seed": 0, "model": "mixtral-8x7b",
    "hardware": {"preset": "a100-40gb", "count": 4},
    "workload": {"synthetic": {"tasks": ["qa", "code", "summarization"], "requests": n, "seed": 1,
                               "prompt_mean": 512, "output_mean": 256}, "arrival": {"process": "batch"}},
    "policy": {"name": "on_demand"}, "limits": {"max_batch_tokens": 8192, "max_running": 32}})
t0 = time.perf_counter()
if chunk:
    from traces.synth import synthesize
    syn = dict(sc["workload"]["synthetic"])
    make = lazy_synthesize if mode == "lazy" else synthesize
    trace = make(get_model(sc["model"]), syn.pop("tasks"), syn.pop("requests"), chunk_tokens=chunk, **syn)
else:
    trace = load_workload_trace(sc, get_model(sc["model"]), lazy=mode == "lazy")
s = run_scenario(sc, trace=trace).summary
src = trace.source
print(json.dumps({"wall_s": time.perf_counter() - t0, "tokens": trace.n_tokens,
                  "chunks": None if src is None else src.n_chunks,
                  "peak_cached": None if src is None else src.peak_cached,
                  "summary": {k: v for k, v in s.items() if k not in ("wall_time_s", "engine_steps_per_s")}}))
"""


def run(mode: str, n: int, chunk: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), str(chunk)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    # RUSAGE_CHILDREN keeps the largest child's peak: run the smaller (lazy) first
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res["rss_grew"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > before
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--chunk-tokens", type=int, default=0, help="0: the scenario's default (400,000)")
    a = ap.parse_args()
    t0 = time.time()
    lazy = run("lazy", a.requests, a.chunk_tokens)
    eager = run("eager", a.requests, a.chunk_tokens)
    for name, r in (("lazy", lazy), ("eager", eager)):
        print(f"{name:5s}: peak RSS {r['peak_rss_mb']:.0f} MB{'' if r['rss_grew'] else ' (not above the previous)'}"
              f", {r['tokens']} tokens, chunks {r['chunks']}, peak chunks held {r['peak_cached']}, "
              f"{r['wall_s']:.1f} s")
    print("same summary:", lazy["summary"] == eager["summary"], f"({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
