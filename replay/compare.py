"""Simulated vs replayed metrics, side by side, with the relative error of each; and, for
two replays with real weights, how far their generated tokens agree."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sim.results import load_results

METRICS = ["ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s",
           "throughput_tokens_per_s", "peak_memory_bytes", "peak_dense_bytes", "peak_experts_bytes",
           "peak_kv_bytes", "weights_plus_cache_bytes", "bytes_loaded", "expert_hit_rate", "misses",
           "reroutes", "routing_fidelity", "requests_completed", "engine_steps"]


def weights_plus_cache(summary: dict) -> float | None:
    if "weights_plus_cache_bytes" in summary:
        return summary["weights_plus_cache_bytes"]
    if "peak_dense_bytes" in summary and "peak_experts_bytes" in summary:
        return summary["peak_dense_bytes"] + summary["peak_experts_bytes"]
    return None


def compare(sim_dir, replay_dir) -> pd.DataFrame:
    s = load_results(sim_dir)["summary"]
    r = load_results(replay_dir)["summary"]
    s = {**s, "weights_plus_cache_bytes": weights_plus_cache(s)}
    rows = []
    for m in METRICS:
        a, b = s.get(m), r.get(m)
        err = (a - b) / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else np.nan
        rows.append((m, a, b, err))
    return pd.DataFrame(rows, columns=["metric", "sim", "replay", "rel_error"]).set_index("metric")


def print_comparison(t: pd.DataFrame, sim_dir, replay_dir) -> None:
    print(f"simulator: {sim_dir}\nreplay:    {replay_dir}")
    print(f"{'metric':28s}{'sim':>16s}{'replay':>16s}{'error':>10s}")
    for m, row in t.iterrows():
        fmt = (lambda v: f"{v / 1e9:14.3f}GB") if m.endswith("bytes") or m == "bytes_loaded" else \
            (lambda v: f"{v:16.4g}")
        a = fmt(row.sim) if row.sim is not None and not pd.isna(row.sim) else f"{'-':>16s}"
        b = fmt(row.replay) if row.replay is not None and not pd.isna(row.replay) else f"{'-':>16s}"
        e = f"{row.rel_error:+9.1%}" if not pd.isna(row.rel_error) else f"{'-':>10s}"
        print(f"{m:28s}{a}{b}{e}")


def compare_generations(dir_a, dir_b) -> dict | None:
    """Two replays with --weights (generations.jsonl): the share of requests whose generated
    tokens are identical, and the mean share of each generation before the first difference."""
    pa, pb = Path(dir_a) / "generations.jsonl", Path(dir_b) / "generations.jsonl"
    if not (pa.exists() and pb.exists()):
        return None
    a = {g["request_id"]: g["generated_ids"] for g in map(json.loads, pa.read_text().splitlines())}
    b = {g["request_id"]: g["generated_ids"] for g in map(json.loads, pb.read_text().splitlines())}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    prefix = []
    for rid in common:
        x, y = a[rid], b[rid]
        n = max(len(x), len(y), 1)
        same = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(same / n)
    return dict(requests_compared=len(common),
                generations_identical=float(np.mean([a[r] == b[r] for r in common])),
                generation_prefix_agreement=float(np.mean(prefix)))
