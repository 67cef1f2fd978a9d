"""Write the notebooks from the cells below (keeps them reviewable as plain Python).

    python notebooks/make_notebooks.py [NAME ...]      # all, or only these (e.g. 05-choose-and-confirm)
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
from traces.model_shape import get_model
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
    "05-choose-and-confirm": [
        "# From capture to a confirmed policy\n"
        "The whole loop on the project's small MoE (`traces/models/emoe-small-moe`): capture its routing, "
        "sweep policies in the simulator, choose the one that meets the SLO and quality floors with the least "
        "memory, then confirm it on this machine: profile, replay for real, simulate exactly what ran, and a "
        "verdict per metric. The same steps on the command line (README, \"From capture to a confirmed "
        "policy\"):\n\n"
        "```\nemoe capture --model traces/models/emoe-small-moe --prompts traces/prompts/heldout-open.jsonl "
        "--max-new-tokens 32 -o runs/small-moe/captured.npz\nemoe sweep scenarios/sweeps/choose-small-moe.yaml -j 2\n"
        "emoe choose runs/small-moe/sweep --slo-attainment 0.9 --min-quality 0.9 -o runs/small-moe/chosen.yaml\n"
        "emoe confirm runs/small-moe/chosen.yaml --device cpu -o runs/small-moe/confirm\n```\n\n"
        "Here it runs smaller (48 prompts, 16 generated tokens: a few CPU-minutes); the tests run it smaller still "
        "(`EMOE_NOTEBOOK_SIZE=small`).",
        SETUP,
        """import os, yaml, torch
import numpy as np
SMALL = os.environ.get("EMOE_NOTEBOOK_SIZE") == "small"      # the tests' reduced size
N_PROMPTS, NEW_TOKENS, SEEDS = (8, 8, [0, 1]) if SMALL else (48, 16, [0, 1, 2])
torch.set_num_threads(1)   # on a shared CPU, one thread per process times steadily (no thread barriers)
work = Path(tempfile.mkdtemp())
# 1. Capture: generate greedily, record every token's routing and the model's shape.
from transformers import AutoModelForCausalLM, AutoTokenizer
from traces.capture import capture, read_prompts
from traces.format import save_trace
model_dir = ROOT / "traces/models/emoe-small-moe"
prompts = read_prompts(ROOT / "traces/prompts/heldout-open.jsonl")
by_task = {}
for p in prompts:                                   # the first prompts of each task, in turn
    by_task.setdefault(p["task"], []).append(p)
picked = [q for group in zip(*by_task.values()) for q in group][:N_PROMPTS]
trace = capture(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                picked, max_new_tokens=NEW_TOKENS, name="emoe-small-moe")
trace_path = save_trace(trace, work / "captured.npz")
print(f"{trace.n_requests} prompts, {trace.n_tokens} tokens; recorded shape:",
      {k: trace.model_shape[k] for k in ("hidden", "n_layers", "n_experts", "top_k", "dtype_bytes")})""",
        "## Sweep and choose\nThe shipped sweep (`scenarios/sweeps/choose-small-moe.yaml`) over the base scenario "
        "(`model: from_trace`: no dimension written by hand), simulated on one A100. A point is feasible if at least "
        "90% of requests meet their SLO and the estimated quality is at least 0.9; of those, the least memory wins.",
        """from sim.choose import choose, format_table, write_chosen
from sim.sweep import load_sweep, run_sweep
from sim import plots
base = yaml.safe_load((ROOT / "scenarios/emoe-small-moe-captured.yaml").read_text())
base["workload"]["trace"] = str(trace_path)
(work / "base.yaml").write_text(yaml.safe_dump(base))
sweep = yaml.safe_load((ROOT / "scenarios/sweeps/choose-small-moe.yaml").read_text())
sweep.update(base=str(work / "base.yaml"), output=str(work / "sweep"), seeds=SEEDS)
(work / "sweep.yaml").write_text(yaml.safe_dump(sweep))
run_sweep(load_sweep(work / "sweep.yaml"), jobs=1, output=work / "sweep", progress=False)
c = choose(work / "sweep", slo_attainment=0.9, min_quality=0.9, objective="memory")
chosen_path = write_chosen(work / "sweep", c.chosen, work / "chosen.yaml", c.constraints)
print(format_table(c.pareto))
print(f"chosen: {c.chosen['label']} at {c.chosen['policy_capacity']:g} of experts")""",
        """fig = plots.pareto(c.pooled.assign(estimated_quality_source="emoe-small-moe"), 0.9, 0.9)
# each configuration: mean over seeds with its 95% interval; grey crosses miss a floor
fig.axes[0].set_title("sweep: peak memory vs mean latency (simulated A100)"); plt.show()""",
        "## Confirm on this machine\n`confirm` profiles this CPU for the model the replay runs (the chosen "
        "scenario's model in float32), replays the scenario with the profile as its hardware, simulates the "
        "replay's own scenario and compares. What it confirms here is the simulator on this machine: on a GPU "
        "the same call (`device='cuda'`) checks the cost model there.",
        """from replay.confirm import confirm
from sim.scenario import load_scenario
over = [("workload.requests", 6)] if SMALL else []
sc = load_scenario(chosen_path, over)
conf = confirm(sc, work / "confirm", "cpu", threads=1, max_copy_mb=1 if SMALL else 16, say=lambda m: None)
print((work / "confirm" / "verdict.txt").read_text())""",
        """rep = conf.report
colors = {"sim": "tab:blue", "replay": "tab:orange"}
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
# (a) relative error of each verdict metric, with its tolerance band
names = [r["check"] for r in conf.rows]
errs = [100 * r["rel_error"] for r in conf.rows]
tols = [100 * r["tolerance"] for r in conf.rows]
x = np.arange(len(names))
ax1.bar(x, tols, width=0.8, bottom=[-t for t in tols], color="0.9", label="tolerance", zorder=0)
ax1.bar(x, [2 * t for t in tols], width=0.8, bottom=[-t for t in tols], color="0.9", zorder=0)
ax1.bar(x, errs, width=0.5, color=["tab:green" if r["passed"] else "tab:red" for r in conf.rows], zorder=1)
ax1.axhline(0, color="k", lw=0.6); ax1.set_xticks(x, names)
ax1.set_ylabel("simulated vs replayed (%)"); ax1.set_title("(a) verdict: error and tolerance"); ax1.legend()
# (b) the replay's own steps priced by the profile: where the simulated step differs
parts = ["attention_s", "experts_s", "fixed_s", "stall_s"]
kinds = list(rep["step_time"])
bottom = np.zeros(len(kinds))
for part, col in zip(parts, ["tab:purple", "tab:cyan", "tab:gray", "tab:red"]):
    v = np.array([rep["step_time"][k][part] for k in kinds])
    ax2.bar(np.arange(len(kinds)) - 0.2, v, 0.4, bottom=bottom, color=col, label=part.replace("_s", ""))
    bottom += v
ax2.bar(np.arange(len(kinds)) + 0.2, [rep["step_time"][k]["wall_s"] for k in kinds], 0.4,
        color=colors["replay"], label="measured wall")
ax2.set_xticks(np.arange(len(kinds)), [f"{k} ({rep['step_time'][k]['steps']} steps)" for k in kinds])
ax2.set_ylabel("seconds, summed over steps"); ax2.set_title("(b) step time: profile's prediction vs measured")
ax2.legend(fontsize=7)
# (c) end-to-end latency of every request, both sides
for side in ("sim", "replay"):
    r = pd.read_csv(work / "confirm" / side / "requests.csv")
    e2e = np.sort(r.e2e_s.dropna().to_numpy())
    ax3.step(e2e, np.arange(1, len(e2e) + 1) / len(e2e), where="post", color=colors[side], label=side)
ax3.set_xlabel("end-to-end latency (s)"); ax3.set_ylabel("share of requests"); ax3.set_title("(c) latency CDF")
ax3.legend(); fig.tight_layout(); plt.show()
print(f"machine load {rep['load_average_before']} -> {rep['load_average_after']}: timings on a busy machine "
      "are noisy; the README lists measured errors")""",
    ],
}


def build(names=None):
    """Write the notebooks (all, or those named: regenerating gives every cell a new id)."""
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = new_notebook()
        nb.cells = [new_markdown_cell(c) if c.startswith("#") else new_code_cell(c) for c in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    import sys
    build(sys.argv[1:] or None)
