"""Benchmark: write and load a 10,000-request Mixtral-8x7B trace (mean 256 prompt + 256 output tokens).

    python benchmarks/bench_trace_io.py [--requests 10000] [--repeats 3] [--dir /tmp]

Prints the median of the repeats; README 'Benchmarks' holds the figures.
"""
import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from traces.format import load_trace, save_trace
from traces.synth import synthesize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    t0 = time.perf_counter()
    tr = synthesize("mixtral-8x7b", ["qa", "summarization", "code", "math", "conversation"], a.requests,
                    seed=0, prompt_mean=256, output_mean=256)
    gen = time.perf_counter() - t0
    path = Path(a.dir) / "bench-trace.npz"
    writes, loads = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        save_trace(tr, path)
        writes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = load_trace(path)
        loads.append(time.perf_counter() - t0)
        assert back.n_tokens == tr.n_tokens
    size = path.stat().st_size
    path.unlink()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(f"trace: {tr.n_requests} requests, {tr.n_tokens} tokens, {size / 1e6:.0f} MB on disk; "
          f"generated in {gen:.1f}s")
    print(f"write (validate + save) median {statistics.median(writes):.2f}s  runs {[round(x, 2) for x in writes]}")
    print(f"load  (read + validate) median {statistics.median(loads):.2f}s  runs {[round(x, 2) for x in loads]}")


if __name__ == "__main__":
    main()
