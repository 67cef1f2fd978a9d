"""Write the notebooks from the cells below (keeps them reviewable as plain Python).

    python notebooks/make_notebooks.py
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
SETUP = """import sys, tempfile
from pathlib import Path
ROOT = Path.cwd() if (Path.cwd() / "traces").exists() else Path.cwd().parent
sys.path.insert(0, str(ROOT))
%matplotlib inline
import matplotlib.pyplot as plt
import pandas as pd"""

NOTEBOOKS = {
    "01-trace-analysis": [
        "# Trace analysis\nWhat the routing in a trace looks like: popularity skew, task specialisation, "
        "temporal reuse, cross-layer affinity and prompt-to-prompt recurrence (definitions in the README).",
        SETUP,
        """from traces.format import load_trace
from traces.stats import trace_stats
trace = load_trace(ROOT / "traces/samples/mixtral-8x7b-mixed.npz")
stats = trace_stats(trace, "decode")
keys = ["requests", "gini", "top_share", "temporal_reuse", "cross_layer_correlation", "inter_prompt_correlation"]
table = pd.DataFrame({t: {k: d[k] for k in keys} for t, d in [("ALL", stats)] + list(stats["per_task"].items())}).T
table.round(3)""",
        "## Expert popularity per task (layer x expert)",
        """from traces.stats import popularity
pop = popularity(trace)
fig, axes = plt.subplots(1, len(pop), figsize=(3 * len(pop), 4), sharey=True)
for ax, (task, p) in zip(axes, pop.items()):
    ax.imshow(p, aspect="auto", cmap="viridis"); ax.set_title(task); ax.set_xlabel("expert")
axes[0].set_ylabel("MoE layer"); plt.show()""",
        "## How much recurrence? The `real` and `paper` routing profiles side by side",
        """from traces.synth import synthesize
from traces.stats import inter_prompt_correlation, request_counts, token_mask
rows = {}
for profile in ("real", "paper"):
    t = synthesize("mixtral-8x7b", ["code", "math"], 80, seed=1, profile=profile)
    c = request_counts(t, token_mask(t, "decode"))
    rows[profile] = {f"lag {k}": inter_prompt_correlation(t, c, lag=k) for k in (1, 2, 5, 10, 20)}
rec = pd.DataFrame(rows)
rec.plot(marker="o", ylabel="correlation of count matrices", xlabel="distance between prompts of a task")
plt.show(); rec.round(3)""",
    ],
    "02-policy-comparison": [
        "# Policy comparison\nThe same workload under each expert policy: memory, latency and routing fidelity.",
        SETUP,
        """from sim.run import run_scenario
from sim.scenario import load_scenario
policies = {"resident": {"name": "resident"}, "on_demand": {"name": "on_demand", "capacity": 0.5},
            "random": {"name": "random", "capacity": 0.5}, "pregated": {"name": "pregated", "capacity": 0.5},
            "moe_infinity": {"name": "moe_infinity", "capacity": 0.5}, "emoe": {"name": "emoe", "capacity": 0.5}}
runs = {}
for name, pol in policies.items():
    sc = load_scenario(ROOT / "scenarios/quickstart.yaml", [("workload.requests", 40), ("policy", pol)])
    runs[name] = run_scenario(sc)
summary = pd.DataFrame({n: r.summary for n, r in runs.items()}).T
summary[["peak_memory_bytes", "peak_experts_bytes", "e2e_mean_s", "tpot_mean_s", "expert_hit_rate",
         "routing_fidelity"]].style.format(precision=3)""",
        """from sim.plots import latency_cdf
fig = latency_cdf({n: r.requests for n, r in runs.items()}); plt.show()""",
        """fig, ax = plt.subplots(figsize=(6, 4))
for n, r in runs.items():
    ax.scatter(r.summary["peak_memory_bytes"] / 1e9, r.summary["routing_fidelity"] * 100, s=60, label=n)
ax.set_xlabel("peak GPU memory (GB)"); ax.set_ylabel("routing fidelity (%)"); ax.legend(); plt.show()""",
        """tl = runs["emoe"].timeline
ax = (tl.set_index("t_s")[["mem_dense", "mem_experts", "mem_kv"]] / 1e9).plot.area(figsize=(7, 3.5))
ax.set_ylabel("GB"); ax.set_title("eMoE memory over time, by part"); plt.show()""",
    ],
    "03-interval-and-skip": [
        "# Predictor interval and skip rule\nA small sweep (in-process, same engine as `emoe sweep`) over the "
        "interval p and the skip rule, on the paper-task trace.",
        SETUP,
        """import yaml
from sim.sweep import load_sweep, run_sweep
work = Path(tempfile.mkdtemp())
(work / "sweep.yaml").write_text(yaml.safe_dump({
    "base": str(ROOT / "scenarios/paper/base-mixtral-paper-tasks.yaml"),
    "set": {"workload.requests": 60, "policy": {"name": "emoe", "capacity": 0.5}},
    "grid": {"policy.interval": [1, 10, 40, 80], "policy.skip": [True, False]}}))
res = run_sweep(load_sweep(work / "sweep.yaml"), jobs=1, output=work / "out", progress=False)
t = res["table"]
t[["policy.interval", "policy.skip", "routing_fidelity", "routing_fidelity_sensitive", "e2e_mean_s",
   "predictor_invocations"]].round(3)""",
        """from sim.plots import vs_interval
fig = vs_interval(t[t["policy.skip"] == True]); plt.show()""",
        """piv = t.pivot(index="policy.interval", columns="policy.skip", values="routing_fidelity_sensitive")
piv.columns = [f"skip={c}" for c in piv.columns]
piv.plot(marker="o", ylabel="fidelity in sensitive layers", xlabel="interval p"); plt.show()""",
    ],
    "04-sim-vs-replay": [
        "# Simulation vs replay\nProfile this machine, replay a small MoE for real (CPU here, CUDA on a GPU), "
        "simulate the same scenario with the measured profile, and compare.",
        SETUP,
        """import yaml
from replay.profile import run_profile, write_profile
from replay.model import scaled_spec
from replay.run import replay_scenario
from sim.models import get_model
from sim.run import run_scenario
from sim.scenario import load_scenario
import torch
work = Path(tempfile.mkdtemp())
base = {"name": "nb", "seed": 0, "model": "tiny", "hardware": {"preset": "a100-40gb", "memory_bytes": 6e6},
        "workload": {"synthetic": {"tasks": ["qa", "code"], "requests": 10, "seed": 1},
                     "arrival": {"process": "poisson", "rate": 20}},
        "policy": {"name": "on_demand", "capacity": 0.5}, "limits": {"max_batch_tokens": 128, "max_running": 8}}
spec = scaled_spec(get_model("tiny"), 1, 4)
calib = load_scenario(data={**base, "policy": {"name": "resident"}, "workload": {**base["workload"],
                                                                                 "arrival": {"process": "batch"}}})
prof = run_profile("cpu", spec, torch.float32, calib, 1 << 20)
write_profile(prof, work / "profile.yaml")
prof["measured"]["expert_s"], prof["measured"]["step_s"]""",
        """sc = load_scenario(data={**base, "hardware": {"profile": str(work / "profile.yaml"), "memory_bytes": 6e6}})
rp = replay_scenario(sc, "cpu")
rp_dir = rp.write(work / "replay")
sim = run_scenario(load_scenario(rp_dir / "scenario.yaml"))
sim_dir = sim.write(work / "sim")
from replay.compare import compare
cmp = compare(sim_dir, rp_dir)
cmp.round(4)""",
        """from sim.plots import sim_vs_replay
fig = sim_vs_replay(cmp.loc[["ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "throughput_tokens_per_s",
                             "weights_plus_cache_bytes", "bytes_loaded", "expert_hit_rate"]].astype(float))
plt.show()""",
    ],
}


def build():
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook()
        nb.cells = [new_markdown_cell(c) if c.startswith("#") else new_code_cell(c) for c in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    build()
