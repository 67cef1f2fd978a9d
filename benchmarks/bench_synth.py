"""Benchmark: generate 10,000 Mixtral-8x7B requests with the `real` profile, against a baseline.

    python benchmarks/bench_synth.py [--requests 10000] [--baseline GIT_REF] [--repeats 1]

The shape is bench_trace_io.py's (five tasks, mean 256 prompt + 256 output tokens, ~5.1 M
tokens). With --baseline, traces/synth.py as it was at GIT_REF is loaded beside the current
one and both are timed in this session, so the ratio does not depend on the machine's load
of the day (run them back to back, nothing else heavy running). README 'Benchmarks' holds
the figures.
"""
import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["qa", "summarization", "code", "math", "conversation"]


def load_baseline(ref: str):
    """traces/synth.py at a git ref, as a module of its own."""
    src = subprocess.run(["git", "show", f"{ref}:traces/synth.py"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_synth.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_synth", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_synth"] = mod
    spec.loader.exec_module(mod)
    return mod


def time_it(synthesize, n: int, repeats: int) -> tuple[float, int]:
    runs, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tr = synthesize("mixtral-8x7b", TASKS, n, seed=0, prompt_mean=256, output_mean=256)
        runs.append(time.perf_counter() - t0)
        tokens = tr.n_tokens
        del tr
    return statistics.median(runs), tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline", metavar="GIT_REF", help="also time traces/synth.py at this git ref")
    a = ap.parse_args()
    from traces.synth import synthesize
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    new, tokens = time_it(synthesize, a.requests, a.repeats)
    print(f"current:  {a.requests} requests, {tokens} tokens in {new:.1f}s (median of {a.repeats})")
    if a.baseline:
        old, old_tokens = time_it(load_baseline(a.baseline).synthesize, a.requests, a.repeats)
        print(f"baseline ({a.baseline}): {old_tokens} tokens in {old:.1f}s; current / baseline = {new / old:.2f}x")


if __name__ == "__main__":
    main()
