"""Simulated vs replayed metrics, side by side, with the relative error of each; whether the
two sides ran the same thing (model shape, dtype, scale, hardware); a pass/fail verdict per
metric against tolerances; and, for two replays with real weights, how far their generated
tokens agree."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from replay.options import DEFAULT_TOLERANCES
from sim.results import load_results
from traces.errors import UserError

# Verdict: tolerance name -> the metric it bounds (relative error, sim vs replay).
VERDICT_METRICS = {"latency": "e2e_mean_s", "throughput": "throughput_tokens_per_s",
                   "memory": "peak_memory_bytes", "ttft": "ttft_mean_s"}
# Model fields that change time or memory: both sides must have run the same values.
SHAPE_FIELDS = ("hidden", "expert_ffn", "n_layers", "n_moe_layers", "n_experts", "top_k", "n_heads", "n_kv_heads",
                "head_dim", "vocab", "dtype_bytes", "n_shared_experts", "shared_ffn", "dense_ffn", "kv_cache_dim",
                "attn_params", "tied_embeddings")

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


# ---- are the two sides comparable? ---------------------------------------------------------------
def _side(d) -> dict:
    """What a results directory says it ran: engine, model fields, hardware, device."""
    p = Path(d)
    res = load_results(p)
    meta = json.loads((p / "meta.json").read_text()) if (p / "meta.json").exists() else {}
    from traces.model_shape import get_model
    model = meta.get("model") or vars(get_model(res["scenario"]["model"]))
    return dict(dir=p, engine=meta.get("engine", "sim"), model=model, hardware=meta.get("hardware") or {},
                device=meta.get("device"), device_name=meta.get("device_name"), dtype=meta.get("dtype"),
                scale=meta.get("scale"), threads=meta.get("threads"), summary=res["summary"])


def _hd(m: dict) -> int:
    return m.get("head_dim") or m["hidden"] // m["n_heads"]


def check_comparable(sim_dir, replay_dir) -> tuple[list[str], list[str]]:
    """(differences that make the comparison meaningless, warnings). Different model shape or
    dtype (a replay at --scale N, or in float32, against a simulation of the full bf16 model)
    compares two different models; a simulation that did not use a profile of the device the
    replay ran on predicts another machine's times."""
    a, b = _side(sim_dir), _side(replay_dir)
    refusals, warnings = [], []
    diff = []
    for f in SHAPE_FIELDS:
        va, vb = (_hd(a["model"]), _hd(b["model"])) if f == "head_dim" else (a["model"].get(f), b["model"].get(f))
        if va != vb:
            diff.append(f"{f} {va} vs {vb}")
    if diff:
        ran = f" (the replay ran {b['model'].get('name')} in {b['dtype']} at scale 1/{b['scale']})" \
            if b["engine"] == "replay" else ""
        refusals.append(f"the two sides ran different models: {', '.join(diff)}{ran}")
    if a["engine"] == "sim" and b["engine"] == "replay":
        hw = a["hardware"]
        measured = hw.get("measured")
        if not measured:
            warnings.append(f"the simulation used hardware '{hw.get('name')}' (datasheet figures), not a profile "
                            f"of the replay's device ({b['device_name']}): its times predict another machine")
        else:
            from sim.costmodel import measured_for
            from traces.model_shape import ModelSpec
            spec = ModelSpec(**{k: v for k, v in a["model"].items() if k in ModelSpec.__dataclass_fields__})
            if measured_for(type("H", (), {"measured": measured})(), spec) is None:
                warnings.append(f"the simulation's profile was measured for {measured.get('model', {}).get('name')}, "
                                f"not {spec.name}: it fell back to the roofline")
            prof_dev = str(hw.get("name", "")).removeprefix("profile:")
            rdev = str(b["device_name"] or "")
            same = prof_dev.startswith("cpu") if rdev == "cpu" else prof_dev == rdev
            if not same:
                refusals.append(f"the simulation's profile was measured on '{prof_dev}', the replay ran on '{rdev}'")
            if b["threads"] and measured.get("threads") and b["device"] == "cpu" \
                    and int(b["threads"]) != int(measured["threads"]):
                warnings.append(f"the profile timed {measured['threads']} CPU threads, the replay ran "
                                f"{b['threads']}")
    return refusals, warnings


# ---- verdict ---------------------------------------------------------------------------------------------
def parse_tolerances(text: str | None) -> dict:
    """'latency=0.05,ttft=0.2' over the defaults; a bare number sets every tolerance."""
    tol = dict(DEFAULT_TOLERANCES)
    if not text:
        return tol
    for part in str(text).split(","):
        key, eq, val = part.strip().partition("=")
        if not eq:
            key, val = None, key
        try:
            v = float(val)
        except ValueError:
            v = -1.0
        if not (v >= 0 and np.isfinite(v)):
            raise UserError(f"--tolerance {text}: '{part}' is not a non-negative number; give e.g. "
                            "latency=0.05,throughput=0.05,memory=0.02,ttft=0.15")
        if key is None:
            tol = {k: v for k in tol}
        elif key not in tol:
            raise UserError(f"--tolerance: unknown metric '{key}'; choose from {', '.join(DEFAULT_TOLERANCES)}")
        else:
            tol[key] = v
    return tol


def verdict(table: pd.DataFrame, tolerances: dict, replay_summary: dict | None = None,
            replays: list[dict] | None = None) -> list[dict]:
    """One row per tolerance: the metric, both values, the relative error and the verdict.
    Memory on CUDA is the allocator's peak (what the device really held), on CPU the
    replay's ledger of its tensors.

    replays: the summaries of repeated replays of the same scenario (two or more). The
    simulation is then judged against their median, and a miss is *inconclusive* rather than
    a FAIL when the replays differ among themselves by more than the tolerance (their range,
    (max - min) / median: `replay_spread`) and the simulation is within the tolerance of some
    point between their lower and upper quartiles (`replay_band`): the device does not
    reproduce itself finely enough to say whether the simulation is off. Replays that agree
    within the tolerance never excuse a miss; the quartiles, not the extremes, bound the
    excuse, so one outlying replay in several does not, and more replays do not widen it."""
    # One replay: the comparison table's values (and the allocator's peak on CUDA)
    cuda = "cuda_max_allocated_bytes"
    lone = {**{m: table.loc[m, "replay"] for m in VERDICT_METRICS.values() if m in table.index},
            **({cuda: replay_summary[cuda]} if replay_summary and replay_summary.get(cuda) else {})}
    rows = []
    for name, tol in tolerances.items():
        metric = VERDICT_METRICS[name]
        sim_v = table.loc[metric, "sim"]
        if name == "memory" and replay_summary and replay_summary.get(cuda):
            metric = f"peak_memory_bytes vs {cuda}"
        values = [_verdict_value(s, name) for s in (replays or [lone])]
        ok_values = all(_finite(v) for v in (sim_v, *values)) and all(values)
        rp_v = float(np.median(values)) if ok_values else None
        err = float((sim_v - rp_v) / rp_v) if ok_values else float("nan")
        ok = bool(ok_values and abs(err) <= tol)
        status = "pass" if ok else "FAIL"
        row = dict(check=name, metric=metric, sim=sim_v if ok_values else None, replay=rp_v, rel_error=err,
                   tolerance=tol, passed=ok, status=status)
        if replays:
            band = [float(q) for q in np.percentile(values, [25, 75])] if ok_values else None
            spread = float((max(values) - min(values)) / rp_v) if ok_values else None
            if band and not ok and spread > tol and band[0] * (1 - tol) <= sim_v <= band[1] * (1 + tol):
                row["status"] = "inconclusive"
            row.update(replays=[float(v) if _finite(v) else None for v in values], replay_band=band,
                       replay_spread=spread)
        rows.append(row)
    return rows


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _verdict_value(summary: dict, name: str):
    """A replay's value of a verdict check's metric (memory on CUDA: the allocator's peak)."""
    if name == "memory" and summary.get("cuda_max_allocated_bytes"):
        return summary["cuda_max_allocated_bytes"]
    return summary.get(VERDICT_METRICS[name])


def format_verdict(rows: list[dict], refusals=(), warnings=()) -> str:
    spread = any(r.get("replay_spread") is not None for r in rows)
    n = max((len(r.get("replays") or ()) for r in rows), default=0)
    lines = [f"{'check':12s}{'metric':26s}{'sim':>13s}{'replay' if not spread else 'median':>13s}"
             f"{'error':>9s}{'tolerance':>11s}" + (f"{'spread':>9s}" if spread else "") + "  verdict"]
    for r in rows:
        gb = "bytes" in r["metric"]
        fmt = (lambda v: f"{v / 1e9:11.4f}GB") if gb else (lambda v: f"{v:13.4g}")
        sv = fmt(r["sim"]) if r["sim"] is not None else f"{'-':>13s}"
        rv = fmt(r["replay"]) if r["replay"] is not None else f"{'-':>13s}"
        err = f"{r['rel_error']:+8.1%}" if r["rel_error"] == r["rel_error"] else f"{'-':>8s}"
        sp = "" if not spread else f"{r['replay_spread']:>9.1%}" if r.get("replay_spread") is not None \
            else f"{'-':>9s}"
        lines.append(f"{r['check']:12s}{r['metric'].split(' ')[0]:26s}{sv}{rv} {err}{r['tolerance']:>10.0%}{sp}  "
                     + _status(r))
    for w in refusals:
        lines.append(f"not comparable: {w}")
    for w in warnings:
        lines.append(f"warning: {w}")
    failed = [r["check"] for r in rows if _status(r) == "FAIL"]
    unsure = [r["check"] for r in rows if _status(r) == "inconclusive"]
    why = ([", ".join(failed) + " outside tolerance"] if failed else []) + \
        (["the two sides are not comparable"] if refusals else [])
    if why:
        lines.append("verdict: NOT CONFIRMED - " + "; ".join(why))
    elif unsure:
        lines.append(f"verdict: INCONCLUSIVE - {', '.join(unsure)}: missed against the median of this device's {n} "
                     "replays of the same scenario, but within the tolerance of their interquartile band: the "
                     "device does not reproduce itself finely enough to tell; rerun on a quieter machine")
    else:
        lines.append("verdict: CONFIRMED - every metric within its tolerance")
    return "\n".join(lines)


def _status(row: dict) -> str:
    return row.get("status") or ("pass" if row["passed"] else "FAIL")


def passed(rows: list[dict], refusals=()) -> bool:
    return all(r["passed"] for r in rows) and not refusals


def inconclusive(rows: list[dict], refusals=()) -> bool:
    """Not confirmed, but only because the device does not reproduce itself within a tolerance."""
    return not refusals and not passed(rows) and all(_status(r) in ("pass", "inconclusive") for r in rows)


def json_safe(obj):
    """NaN (a metric one side lacks) as null: JSON has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
