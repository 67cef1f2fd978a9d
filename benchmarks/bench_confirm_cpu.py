"""Benchmark: `emoe confirm --device cpu` on resident, on_demand and eMoE, repeated.

Mixtral-8x7B's shape at 1/32 hidden size (float32 on CPU), the shipped Mixtral trace, 12
requests at 2 req/s; on_demand and eMoE keep 62.5% of experts (5 of 8 per layer). Each run
is a whole `emoe confirm` (profile with the scenario's policy, replay, simulate the replay's
own scenario, verdict); rounds interleave the policies, so a slow spell of the shared machine
lands on all of them. Writes runs.json and summary.md (relative errors sim vs replay of mean
end-to-end latency, throughput, peak memory and mean TTFT per run, with the machine's load).
With --replays N each confirm replays its scenario N times, one after another: the table then
gives the error against their median, their own spread (how far the machine reproduces
itself), and each run's verdict (pass, FAIL, or inconclusive: a miss within that spread):

    python benchmarks/bench_confirm_cpu.py [-o benchmarks/out/confirm-cpu] [--repeats 3] [--threads 1] [--replays 1]
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replay.confirm import confirm
from replay.gpucheck import POLICIES, scenario

CHECKS = ("latency", "throughput", "memory", "ttft")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="benchmarks/out/confirm-cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=int, default=32)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no thread barriers on a busy machine)")
    ap.add_argument("--policies", default="resident,on_demand,emoe")
    ap.add_argument("--replays", type=positive, default=1, help="replays per confirm (the verdict takes their median)")
    a = ap.parse_args(argv)
    out = Path(a.output)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; choose another -o")
    runs = []
    for rep in range(1, a.repeats + 1):
        for name in a.policies.split(","):
            sc = scenario(POLICIES[name], None, a.requests, a.rate)
            c = confirm(sc, out / f"run{rep}-{name}", "cpu", a.scale, None, None, None, a.threads, 16,
                        say=lambda m, n=name, r=rep: print(f"run {r} {n}: {m}", flush=True), replays=a.replays)
            rows = {r["check"]: r["rel_error"] for r in c.rows}
            runs.append(dict(run=rep, policy=name, errors=rows, passed=c.passed, inconclusive=c.inconclusive,
                             status={r["check"]: r["status"] for r in c.rows},
                             spread={r["check"]: r.get("replay_spread") for r in c.rows},
                             replays={r["check"]: r.get("replays") for r in c.rows},
                             load_before=c.report["load_average_before"], load_after=c.report["load_average_after"],
                             step_time={k: v["error"] for k, v in c.report["step_time"].items()},
                             noisy=c.report["warnings"]))
            print(f"run {rep} {name}: " + ", ".join(f"{k} {v:+.1%}" for k, v in rows.items()), flush=True)
    (out / "runs.json").write_text(json.dumps(runs, indent=2))
    lines = [f"# emoe confirm on CPU: Mixtral-8x7B/{a.scale}, {a.requests} requests at {a.rate} req/s, "
             f"{a.threads} thread(s), {os.cpu_count()} cores", "",
             "| run | policy | mean e2e | throughput | peak memory | mean TTFT | step time (decode / prefill) "
             "| load before -> after |", "|---|---|---|---|---|---|---|---|"]
    if a.replays > 1:
        lines[0] += f", {a.replays} replays each: error against their median (their spread; verdict)"
    for r in runs:
        e = r["errors"]
        st = " / ".join(f"{r['step_time'][k]:+.1%}" for k in ("decode", "prefill") if k in r["step_time"])
        cells = [f"{e[k]:+.1%}" if a.replays == 1 else
                 f"{e[k]:+.1%} ({_pct(r['spread'][k])}; {r['status'][k]})" for k in CHECKS]
        lines.append(f"| {r['run']} | {r['policy']} | " + " | ".join(cells)
                     + f" | {st} | {r['load_before']} -> {r['load_after']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


if __name__ == "__main__":
    main()
