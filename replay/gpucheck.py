"""The GPU check, one command (sized for under 8 minutes on one H200):

    python -m replay.gpucheck -o DIR [--device cuda] [--scale 1] [--requests 32]

1. `emoe profile` on the device for Mixtral-8x7B at its real shape (bf16);
2. replay the shipped Mixtral trace with `resident` and with eMoE at 62.5% of
   experts (5 of 8 per layer), hardware = the measured profile;
3. simulate the same two scenarios with the measured profile;
4. write DIR/comparison.md and DIR/comparison.json: sim vs replay per metric, and
   the replay's host-to-device bandwidth against the profiled one at that copy size;
   DIR/timeline-{replay,sim}-POLICY.json: both runs' first 20 steps per layer (Chrome
   trace format; the replay's from CUDA events).

On a CPU (`--device cpu --scale 32`) the same flow runs in a few minutes: that is
how it is tested without a GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from replay.compare import compare
from replay.model import scaled_spec
from replay.profile import run_profile, write_profile
from replay.run import DTYPES, replay_scenario
from sim.chrometrace import write_chrome_trace
from sim.run import run_scenario
from sim.scenario import load_scenario
from traces.model_shape import get_model

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "traces" / "samples" / "mixtral-8x7b-mixed.npz"
POLICIES = {"resident": {"name": "resident"}, "emoe": {"name": "emoe", "capacity": 0.625, "interval": 8},
            "on_demand": {"name": "on_demand", "capacity": 0.625}}


def scenario(policy: dict, profile: Path | None, requests: int, rate: float) -> dict:
    data = {"name": f"gpucheck-{policy['name']}", "seed": 0, "model": "mixtral-8x7b",
            "hardware": {"profile": str(profile)} if profile else {"preset": "h200"},
            "workload": {"trace": str(TRACE), "requests": requests, "arrival": {"process": "poisson", "rate": rate},
                         "slo": {"default": {"ttft_s": 5.0, "e2e_s": 60.0}}},
            "policy": policy, "scheduler": {"name": "emoe" if policy["name"] == "emoe" else "fcfs"},
            "limits": {"max_batch_tokens": 4096, "max_running": 32, "memory_utilization": 0.9}}
    return load_scenario(data=data)


def bandwidth_at(copies: list, nbytes: float) -> float:
    pinned = [c for c in copies if c["pinned"]] or copies
    sizes = np.array([c["bytes"] for c in pinned], dtype=float)
    bw = np.array([c["bytes_per_s"] for c in pinned])
    return float(np.interp(np.log(nbytes), np.log(sizes), bw))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--policies", default="resident,emoe", help=f"comma-separated, from {list(POLICIES)}")
    ap.add_argument("--calibration-requests", type=int, default=24)
    ap.add_argument("--max-copy-mb", type=int, default=0,
                    help="largest copy profiled (default: 512 on cuda, 64 on cpu)")
    a = ap.parse_args(argv)
    out = Path(a.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dtype_name = "bfloat16" if a.device.startswith("cuda") else "float32"
    dtype = DTYPES[dtype_name]
    spec = scaled_spec(get_model("mixtral-8x7b"), a.scale, torch.tensor([], dtype=dtype).element_size())
    log = []

    def say(msg):
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        log.append(line)

    say(f"profiling {spec.name} on {a.device}")
    calib = scenario({"name": "resident"}, None, a.calibration_requests, 100.0)
    calib["workload"]["arrival"] = {"process": "batch"}
    host = {}   # one model's host-side experts, shared by the calibration and both replays
    max_copy = (a.max_copy_mb << 20) or (1 << 29 if a.device.startswith("cuda") else 1 << 26)
    prof = run_profile(a.device, spec, dtype, calib, max_copy, a.scale, host_experts=host)
    prof_path = write_profile(prof, out / "profile.yaml")
    say(f"profile: h2d {prof['hardware']['h2d_bytes_per_s'] / 1e9:.1f} GB/s -> {prof_path}")
    report = {"device": prof["info"]["device"], "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for name in a.policies.split(","):
        pol = POLICIES[name]
        sc = scenario(pol, prof_path, a.requests, a.rate)
        say(f"replaying {name}")
        rp = replay_scenario(sc, a.device, a.scale, dtype_name, host_experts=host)
        rp_dir = rp.write(out / f"replay-{name}")
        say(f"simulating {name}")
        sim = run_scenario(load_scenario(rp_dir / "scenario.yaml"))
        sim_dir = sim.write(out / f"sim-{name}")
        table = compare(sim_dir, rp_dir)
        for kind, d in (("replay", rp_dir), ("sim", sim_dir)):    # per layer, first 20 steps: opens in Perfetto
            write_chrome_trace(d, out / f"timeline-{kind}-{name}.json", layers=True)
        entry = {"comparison": table.reset_index().to_dict(orient="records"), "replay_summary": rp.summary}
        if rp.summary.get("h2d_bytes_per_s"):
            prof_bw = bandwidth_at(prof["copies"], spec.bytes_per_expert)
            entry["h2d_replay_bytes_per_s"] = rp.summary["h2d_bytes_per_s"]
            entry["h2d_profile_bytes_per_s"] = prof_bw
            entry["h2d_share_of_profile"] = rp.summary["h2d_bytes_per_s"] / prof_bw
        report["runs"][name] = entry
        say(f"{name}: e2e sim {sim.summary['e2e_mean_s']:.3f}s vs replay {rp.summary['e2e_mean_s']:.3f}s")
    (out / "comparison.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# GPU check: {report['device']}, {report['date']}", ""]
    for name, entry in report["runs"].items():
        lines += [f"## {name}", "", "| metric | sim | replay | error |", "|---|---|---|---|"]
        for row in entry["comparison"]:
            if row["sim"] is None or row["replay"] is None:
                continue
            err = "" if row["rel_error"] != row["rel_error"] else f"{row['rel_error']:+.1%}"
            lines.append(f"| {row['metric']} | {row['sim']:.4g} | {row['replay']:.4g} | {err} |")
        if "h2d_share_of_profile" in entry:
            lines.append(f"\nreplay host-to-device {entry['h2d_replay_bytes_per_s'] / 1e9:.2f} GB/s = "
                         f"{entry['h2d_share_of_profile']:.0%} of the profiled "
                         f"{entry['h2d_profile_bytes_per_s'] / 1e9:.2f} GB/s at one expert's size")
        lines.append("")
    (out / "comparison.md").write_text("\n".join(lines + ["", "```", *log, "```"]))
    say(f"wrote {out / 'comparison.md'}")


if __name__ == "__main__":
    main()
