"""Benchmark: a trace mapped and released request by request vs read into memory (issue 16).

    python benchmarks/bench_trace_stream.py [--requests 10000] [--repeats 3] [--dir /tmp]

Writes a Mixtral-8x7B trace of N requests (512 prompt + 256 output tokens each: 1.5 GB at
10,000), then, each in a fresh process, loads it and reads every request's routing rows in
order, as an engine does: (a) mapped, releasing each request after reading it (Trace.release),
(b) mapped without releasing, (c) mmap=False (read into memory). Prints the medians of the
repeats of load time, read time and the process's peak RSS. Each child reports its own peak,
/proc/self/status VmHWM (the peak of its own address space). Not getrusage's ru_maxrss: Linux
carries the parent's peak over a vfork + exec (Python's subprocess) into the child's, and
RUSAGE_CHILDREN is the maximum over every child so far; the trace is also written in a child
so that the parent stays small. The file is in the page cache (just written): this measures
memory and mapping, not the disk.

The routing is a small synthetic trace tiled to N requests: this measures I/O, not routing
realism, and synthesising 7.7 M tokens would take minutes.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODES = ("mapped+release", "mapped", "in-memory")


def make_trace(n: int, path: Path) -> Path:
    from traces.format import Trace, save_trace
    from traces.synth import synthesize
    small = synthesize("mixtral-8x7b", ["qa", "code"], 16, seed=0, prompt_mean=512, output_mean=256)
    prompt, output = np.full(n, 512, np.int32), np.full(n, 256, np.int32)
    T = int(prompt.sum() + output.sum())
    shape = (T,) + small.experts.shape[1:]
    t = Trace(model=small.model, n_layers=small.n_layers, n_experts=small.n_experts, top_k=small.top_k,
              request_id=[f"r{i:06d}" for i in range(n)], task=np.resize(small.task, n), prompt_tokens=prompt,
              output_tokens=output, experts=np.resize(small.experts, shape), gates=np.resize(small.gates, shape),
              extra={"generator": "bench_trace_stream: a 16-request synthetic trace tiled"})
    return save_trace(t, path)


def peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux; bytes on macOS


def child(mode: str, path: str) -> None:
    """One measurement, in its own process: load, read every request's rows in order."""
    from traces.format import load_trace
    base = peak_rss()   # the interpreter, numpy, emoe
    t0 = time.perf_counter()
    tr = load_trace(path, mmap=mode != "in-memory")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    check = 0
    for r in range(tr.n_requests):
        sl = tr.token_slice(r)
        check += int(tr.experts[sl].sum()) + int(tr.gates[sl].view(np.uint16)[:, :, 0].sum())
        if mode == "mapped+release":
            tr.release(r)
    read_s = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps(dict(load_s=load_s, read_s=read_s, peak_rss=peak, base_rss=base, check=check)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, path = a.child
        return make_trace(a.requests, Path(path)) if mode == "make" else child(mode, path)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    path = Path(a.dir) / "bench-trace-stream.npz"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--requests", str(a.requests), "--child", "make", str(path)], env=env,
                   check=True)
    made = time.perf_counter() - t0
    runs = {m: [] for m in MODES}
    try:
        for _ in range(a.repeats):
            for m in MODES:   # interleaved: a change in the machine's load touches every mode alike
                out = subprocess.run([sys.executable, __file__, "--child", m, str(path)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                runs[m].append(json.loads(out))
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    checks = {r["check"] for m in MODES for r in runs[m]}
    assert len(checks) == 1, "the modes read different routing"
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    print(f"trace: {a.requests} requests x 768 tokens, {size / 1e9:.2f} GB on disk; generated and written in "
          f"{made:.1f}s; medians of {a.repeats}")
    for m in MODES:
        med = {k: statistics.median(r[k] for r in runs[m]) for k in ("load_s", "read_s", "peak_rss", "base_rss")}
        print(f"  {m:15s} load {med['load_s']:6.2f}s  read every request {med['read_s']:6.2f}s  "
              f"peak RSS {med['peak_rss'] / 1e6:6.0f} MB (before loading {med['base_rss'] / 1e6:.0f} MB; "
              f"peaks {[round(r['peak_rss'] / 1e6) for r in runs[m]]})")


if __name__ == "__main__":
    main()
