"""Benchmark: the 40-point quickstart sweep with -j 2 vs -j 1, in one run (ratio of medians).

    python benchmarks/bench_sweep.py [--repeats 3]
"""
import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from sim.sweep import load_sweep, run_sweep

SWEEP = Path(__file__).parent.parent / "scenarios" / "sweeps" / "quickstart-40.yaml"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    spec = load_sweep(SWEEP)
    times = {1: [], 2: []}
    for _ in range(a.repeats):
        for jobs in (1, 2):   # alternate, so both see the same machine load
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                res = run_sweep(spec, jobs=jobs, output=Path(d) / "s", progress=False)
                times[jobs].append(time.perf_counter() - t0)
                assert res["failed"] == 0 and res["ran"] == 40
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"-j 1 median {m1:.1f}s {[round(x, 1) for x in times[1]]}; -j 2 median {m2:.1f}s "
          f"{[round(x, 1) for x in times[2]]}; speed-up {m1 / m2:.2f}x")


if __name__ == "__main__":
    main()
