"""Benchmark: a day of traffic on one machine -- simulator time and peak memory at scale.

    python benchmarks/bench_scale.py [--repeats 3] [--cases 1k-sat,10k-10,100k-sat,sweep-40]

Mixtral-8x7B on 4x A100-40GB, on_demand at capacity 0.6, max 32 running, 8,192 tokens a step;
requests of 512 prompt and 256 output tokens on average (the trace's lognormal lengths).

  1k-sat     1,000 requests, all at t=0
  10k-10     10,000 requests, Poisson at 10 requests/s
  100k-sat   100,000 requests, all at t=0 (a 14.7 GB trace file: 192 bytes of routing a token)
  100k-short, 1m-short  100,000 and 1,000,000 requests of 64 + 32 tokens (mean), all at t=0:
             how time and memory grow with the number of requests (all of them queued at once)
  100k-short-day, 1m-short-day  the same requests arriving as a Poisson process at 2.7 requests/s
             (~90% of what the engine serves): a day of traffic, with a short queue
  sweep-40   a 40-point sweep with -j 2 over the 10,000-request trace (each point cut at 2,000
             steps: what is measured is what the workers load, not how long they simulate)

Each case runs in a fresh subprocess that reports its own peak RSS (ru_maxrss), its CPU time
(the kernel's part: mapping the trace's pages in) and major page faults (pages read from disk,
not the page cache), its results written as `emoe run` writes them (requests and timeline as
CSV and Parquet); the time is the simulation's, the writing's apart. The sweep's
figures are peaks of its whole process tree (the parent and its -j workers) sampled every
0.1 s, as summed RSS and as summed PSS (pages shared between processes, such as the mapped
trace and the libraries, counted once), beside the same for one point run alone (`emoe run`).
Traces: a 500-request synthetic trace tiled (request i routes as request i % 500 of it), written
once to benchmarks/out/ (synthesising 100,000 requests would take the generator about an hour;
tiling does not change what a step costs). Prints the median of the repeats per case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "out"
SEED_REQUESTS = 500
CASES = {"1k-sat": (1_000, {"process": "batch"}), "10k-10": (10_000, {"process": "poisson", "rate": 10.0}),
         "100k-sat": (100_000, {"process": "batch"}),
         # short requests (64 + 32 tokens mean): a million fit this machine's disk (18 GB of routing)
         "100k-short": (100_000, {"process": "batch"}), "1m-short": (1_000_000, {"process": "batch"}),
         # a day of traffic arrives over the day: Poisson at ~90% of what the engine serves of
         # these requests (2.98 requests/s, the 1m-short makespan's): the queue stays short
         "100k-short-day": (100_000, {"process": "poisson", "rate": 2.7}),
         "1m-short-day": (1_000_000, {"process": "poisson", "rate": 2.7})}
SHORT = (64, 32)   # prompt and output tokens (means) of the *-short cases


class Tiled:
    """Rows of a routing array repeated request by request: row r of request i is row r of
    request i % n of the seed trace. Read by slices, as the trace writer reads."""

    def __init__(self, seed_rows: np.ndarray, seed_offsets: np.ndarray, n_requests: int):
        self.seed, self.seed_offsets = seed_rows, seed_offsets
        n = len(seed_offsets) - 1
        lengths = np.diff(seed_offsets)[np.arange(n_requests) % n]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.shape = (int(self.offsets[-1]),) + seed_rows.shape[1:]
        self.dtype, self.ndim = seed_rows.dtype, seed_rows.ndim

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("Tiled rows are read by slices")
        lo, hi, _ = key.indices(self.shape[0])
        n = len(self.seed_offsets) - 1
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        parts, i = [], first
        while i < len(self.offsets) - 1 and self.offsets[i] < hi:
            s0 = self.seed_offsets[i % n]
            a, b = max(lo, self.offsets[i]) - self.offsets[i], min(hi, self.offsets[i + 1]) - self.offsets[i]
            parts.append(self.seed[s0 + a: s0 + b])
            i += 1
        return np.concatenate(parts) if parts else self.seed[:0]


def trace_for(n: int, short: bool = False) -> Path:
    """The tiled trace of n requests (written once)."""
    from traces.format import Trace, load_trace, save_trace
    from traces.synth import synthesize
    OUT.mkdir(exist_ok=True)
    tag = "short-" if short else ""
    path = OUT / f"scale-{tag}{n}.npz"
    if path.exists():
        return path
    seed_path = OUT / f"scale-{tag}seed-{SEED_REQUESTS}.npz"
    prompt, output = SHORT if short else (512, 256)
    if not seed_path.exists():
        save_trace(synthesize("mixtral-8x7b", ["qa", "summarization", "code", "math", "conversation"], SEED_REQUESTS,
                              seed=0, prompt_mean=prompt, output_mean=output), seed_path)
    s = load_trace(seed_path)
    idx = np.arange(n) % SEED_REQUESTS
    t = Trace(model=s.model, n_layers=s.n_layers, n_experts=s.n_experts, top_k=s.top_k,
              request_id=np.array([f"r{i:07d}" for i in range(n)]), task=s.task[idx],
              prompt_tokens=s.prompt_tokens[idx], output_tokens=s.output_tokens[idx],
              experts=Tiled(s.experts, s.offsets, n), gates=Tiled(s.gates, s.offsets, n),
              extra={"generator": f"bench_scale: {seed_path.name} tiled to {n} requests"})
    print(f"writing {path.name} ({t.n_tokens * s.n_layers * s.top_k * 3 / 1e9:.1f} GB)...", flush=True)
    save_trace(t, path)
    return path


def scenario(trace: Path, arrival: dict, max_steps: int = 0) -> dict:
    limits = {"max_batch_tokens": 8192, "max_running": 32}
    if max_steps:
        limits["max_steps"] = max_steps
    return {"name": "scale", "model": "mixtral-8x7b", "hardware": {"preset": "a100-40gb", "count": 4},
            "workload": {"trace": str(trace), "arrival": arrival},
            "policy": {"name": "on_demand", "capacity": 0.6}, "limits": limits}


def child(case: str) -> None:
    """One measurement, in this (fresh) process: prints a JSON line."""
    from sim.run import run_scenario
    from sim.scenario import load_scenario
    n, arrival = CASES[case]
    sc = load_scenario(data=scenario(trace_for(n, "short" in case), arrival))
    t0 = time.perf_counter()
    res = run_scenario(sc)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=OUT) as d:   # the results written, as `emoe run` does
        res.write(Path(d) / "results")
        write_s = time.perf_counter() - t0 - wall
    use = resource.getrusage(resource.RUSAGE_SELF)
    rss = use.ru_maxrss * 1024
    print(json.dumps(dict(case=case, wall_s=wall, write_s=write_s, cpu_s=use.ru_utime + use.ru_stime,
                          sys_s=use.ru_stime, major_faults=use.ru_majflt, peak_rss_bytes=rss,
                          steps=res.summary["engine_steps"], e2e_mean_s=res.summary["e2e_mean_s"],
                          completed=res.summary["requests_completed"])))


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of pid and its descendants, summed (from /proc). PSS shares each page among
    the processes that map it: the mapped trace and the libraries count once, not per worker."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


def _sampled(cmd: list[str]) -> dict:
    """Run cmd, sampling its process tree's memory every 0.1 s: peak summed RSS and PSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.1)
    th = threading.Thread(target=sample)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip()}")
    return dict(wall_s=time.perf_counter() - t0, peak_rss_bytes=peak[0], peak_pss_bytes=peak[1])


def sweep_case() -> dict:
    """A 40-point -j 2 sweep over the 10,000-request trace, and one of its points run alone
    (`emoe run`): peak memory of each whole process tree, and their ratio."""
    import yaml
    trace = trace_for(10_000)
    base = scenario(trace, CASES["10k-10"][1], max_steps=2000)
    spec = {"base": "base.yaml", "grid": {"policy.capacity": [round(0.3 + 0.05 * i, 2) for i in range(10)],
                                          "seed": [0, 1, 2, 3]}}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "base.yaml").write_text(yaml.safe_dump(base))
        (Path(d) / "sweep.yaml").write_text(yaml.safe_dump(spec))
        one = _sampled([sys.executable, "-m", "sim.cli", "run", str(Path(d) / "base.yaml"), "-o", str(Path(d) / "one")])
        sweep = _sampled([sys.executable, "-m", "sim.cli", "sweep", str(Path(d) / "sweep.yaml"), "-j", "2",
                          "-o", str(Path(d) / "s")])
    return dict(case="sweep-40", wall_s=sweep["wall_s"], peak_rss_bytes=sweep["peak_rss_bytes"],
                peak_pss_bytes=sweep["peak_pss_bytes"], one_rss_bytes=one["peak_rss_bytes"],
                one_pss_bytes=one["peak_pss_bytes"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="1k-sat,10k-10,100k-sat,sweep-40")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    for case in a.cases.split(","):
        runs = []
        for _ in range(a.repeats):
            if case == "sweep-40":
                runs.append(sweep_case())
                continue
            if case in CASES:
                trace_for(CASES[case][0], "short" in case)   # written outside the measurement
            out = subprocess.run([sys.executable, __file__, "--child", case], cwd=ROOT, capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                raise SystemExit(f"{case} failed:\n{out.stderr}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        wall = statistics.median(r["wall_s"] for r in runs)
        rss = statistics.median(r["peak_rss_bytes"] for r in runs)
        extra = f", {runs[0]['steps']:,} steps, mean e2e {runs[0]['e2e_mean_s']:.2f} s" if "steps" in runs[0] else ""
        if "cpu_s" in runs[0]:   # CPU time: what a loaded machine's wall clock blurs
            extra += f", CPU {statistics.median(r['cpu_s'] for r in runs):.1f} s"
            # of it in the kernel (page faults of the mapped trace), and pages read from disk
            extra += (f" ({statistics.median(r['sys_s'] for r in runs):.1f} s system, "
                      f"{statistics.median(r['major_faults'] for r in runs):,.0f} major page faults)")
        if "write_s" in runs[0]:
            extra += f", results written in {statistics.median(r['write_s'] for r in runs):.1f} s"
        if case == "sweep-40":
            one_rss = statistics.median(r["one_rss_bytes"] for r in runs)
            pss = statistics.median(r["peak_pss_bytes"] for r in runs)
            one_pss = statistics.median(r["one_pss_bytes"] for r in runs)
            extra = (f"; one point alone: RSS {one_rss / 1e6:,.0f} MB, PSS {one_pss / 1e6:,.0f} MB; sweep / one: "
                     f"RSS {rss / one_rss:.2f}x, PSS {pss / one_pss:.2f}x (sweep PSS {pss / 1e6:,.0f} MB)")
        print(f"{case}: median {wall:.2f} s (runs {[round(r['wall_s'], 2) for r in runs]}), "
              f"peak RSS {rss / 1e6:,.0f} MB{extra}; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
