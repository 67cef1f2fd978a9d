"""Choosing a policy from a sweep: constraints, a Pareto set, one chosen point.

A sweep's table holds one row per point (and per seed). Choosing:
1. rows of one configuration run with several seeds are pooled (mean, and the 95%
   interval of the mean where there are at least two seeds);
2. a configuration is *feasible* when its SLO attainment and estimated quality meet
   the user's floors (quality beside latency: a point is never chosen on latency
   alone);
3. the feasible *Pareto set* keeps the configurations no other feasible one beats on
   peak memory, mean end-to-end latency and estimated quality at once;
4. the *chosen* one is the best of the Pareto set by the objective, ties broken by
   the other two.
The chosen configuration's resolved scenario (from OUTPUT/points/<hash>/scenario.yaml)
is what `emoe replay` and `emoe confirm` run, so the replay runs what was simulated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.plots import pareto_mask
from traces.errors import UserError
from traces import yamlio

# objective name -> (column, sign): smaller sign * value is better
OBJECTIVES = {"memory": ("peak_memory_bytes", 1), "latency": ("e2e_mean_s", 1), "p99": ("e2e_p99_s", 1),
              "throughput": ("throughput_tokens_per_s", -1), "quality": ("estimated_quality", -1)}
# Columns of the printed table: (column, header, format)
SHOWN = [("label", "policy", "{}"), ("parameters", "parameters", "{}"), ("policy_capacity", "capacity", "{:.3g}"),
         ("hash", "point", "{}"), ("seeds", "seeds", "{:d}"), ("slo_attainment", "SLO", "{:.1%}"),
         ("estimated_quality", "est. quality", "{:.3f}"), ("peak_memory_bytes", "memory GB", "gb"),
         ("e2e_mean_s", "e2e mean s", "{:.3f}"), ("e2e_p99_s", "e2e p99 s", "{:.3f}"),
         ("throughput_tokens_per_s", "tok/s", "{:.1f}")]
METRICS = [c for c, _, _ in SHOWN[5:]]
NOT_CONFIG = {"point", "hash", "seed", "seed_used", "status", "error"}


class ChooseError(UserError):
    """A user's mistake: a directory that is no sweep, no finished point, nothing feasible."""


@dataclass
class Choice:
    pooled: pd.DataFrame      # one row per configuration: metrics (mean), CI half-widths, feasibility
    pareto: pd.DataFrame      # the feasible Pareto set, best by the objective first
    chosen: pd.Series | None
    constraints: dict


def load_table(sweep_dir) -> pd.DataFrame:
    d = Path(sweep_dir)
    p = d / "table.csv"
    if not p.exists():
        raise ChooseError(f"'{d}' is not a sweep directory (no table.csv); run `emoe sweep SWEEP.yaml` first")
    t = pd.read_csv(p)
    done = t[t.status == "done"] if "status" in t else t
    if done.empty:
        errors = t.error.dropna().unique()[:1] if "error" in t else []
        why = f" (first error: {errors[0]})" if len(errors) else ""
        raise ChooseError(f"{p}: no point of this sweep finished{why}; fix the sweep and run it again")
    return done.reset_index(drop=True)


def _config_columns(t: pd.DataFrame) -> list[str]:
    """The columns that say which configuration a row is: the swept keys (a sweep table lists
    them between `hash` and the columns every table gets, from `policy_name` on), less the seed."""
    cols = list(t.columns)
    swept = cols[cols.index("hash") + 1: cols.index("policy_name")] if "policy_name" in cols else []
    return [c for c in swept if c not in NOT_CONFIG] or ["label"]


def _parameters(sweep_dir: Path, h: str) -> str:
    """The chosen policy's own parameters (besides name and capacity), from its resolved scenario."""
    p = sweep_dir / "points" / h / "scenario.yaml"
    if not p.exists():
        return ""
    pol = yamlio.safe_load(p.read_text()).get("policy", {})
    rest = {k: v for k, v in pol.items() if k not in ("name", "capacity") and v is not None}
    sched = yamlio.safe_load(p.read_text()).get("scheduler", {}).get("name")
    text = ", ".join(f"{k}={v}" for k, v in sorted(rest.items()))
    return f"{text}; {sched}" if sched and sched != "fcfs" else text


def pool_seeds(t: pd.DataFrame, sweep_dir: Path) -> pd.DataFrame:
    """One row per configuration: mean of each metric over seeds, 95% half-width as `<metric>_ci`."""
    keys = _config_columns(t)
    rows = []
    for _, g in t.groupby([t[k].astype(str) for k in keys], sort=False, dropna=False):
        first = g.iloc[0]
        row = {"label": first.get("label", ""), "policy_capacity": first.get("policy_capacity", np.nan),
               "hash": first["hash"], "seeds": len(g), "hashes": ",".join(g.hash.astype(str))}
        for m in METRICS:
            vals = pd.to_numeric(g[m], errors="coerce") if m in g else pd.Series([np.nan])
            row[m] = float(vals.mean())
            # Student-t 95% interval of the mean (1.96 for many seeds); none for one seed.
            n = vals.notna().sum()
            row[f"{m}_ci"] = float(_t95(n) * vals.std(ddof=1) / np.sqrt(n)) if n >= 2 else np.nan
        row["parameters"] = _parameters(sweep_dir, str(first["hash"]))
        rows.append(row)
    return pd.DataFrame(rows)


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n samples (n - 1 degrees of freedom)."""
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    return table.get(n, 1.96 if n > 30 else 2.09)


def choose(sweep_dir, slo_attainment: float = 0.0, min_quality: float = 0.0, max_memory_gb: float | None = None,
           objective: str = "memory") -> Choice:
    if objective not in OBJECTIVES:
        raise ChooseError(f"--minimise/--maximise: unknown objective '{objective}'; choose from "
                          f"{', '.join(OBJECTIVES)}")
    for name, v in (("--slo-attainment", slo_attainment), ("--min-quality", min_quality)):
        if not 0.0 <= v <= 1.0:
            raise ChooseError(f"{name} must be a share in [0, 1], got {v}")
    d = Path(sweep_dir)
    pooled = pool_seeds(load_table(d), d)
    q = pooled.estimated_quality.fillna(1.0)   # no calibration: nothing to constrain on
    feasible = (pooled.slo_attainment >= slo_attainment) & (q >= min_quality)
    if max_memory_gb is not None:
        feasible &= pooled.peak_memory_bytes <= max_memory_gb * 1e9
    pooled["feasible"] = feasible
    pooled["pareto"] = False
    idx = np.flatnonzero(feasible.to_numpy())
    if len(idx):
        pts = np.stack([pooled.peak_memory_bytes.to_numpy()[idx], pooled.e2e_mean_s.to_numpy()[idx],
                        -q.to_numpy()[idx]], axis=1)
        pooled.loc[idx[pareto_mask(pts)], "pareto"] = True
    col, sign = OBJECTIVES[objective]
    others = [c for c, _ in (OBJECTIVES["memory"], OBJECTIVES["latency"]) if c != col] + ["estimated_quality"]
    front = pooled[pooled.pareto].copy()
    front["_key"] = sign * front[col]
    front = front.sort_values(["_key"] + [c for c in others if c != col],
                              ascending=[True] + [c != "estimated_quality" for c in others if c != col])
    front = front.drop(columns="_key")
    chosen = front.iloc[0] if len(front) else None
    return Choice(pooled, front, chosen, dict(slo_attainment=slo_attainment, min_quality=min_quality,
                                              max_memory_gb=max_memory_gb, objective=objective))


def format_table(front: pd.DataFrame) -> str:
    """The Pareto set as a plain-text table (every value with its 95% interval where seeds allow)."""
    cells = [[h for _, h, _ in SHOWN]]
    for _, r in front.iterrows():
        row = []
        for c, _, fmt in SHOWN:
            v = r.get(c)
            if v is None or (isinstance(v, float) and np.isnan(v)):
                row.append("-")
                continue
            text = f"{v / 1e9:.3g}" if fmt == "gb" else fmt.format(int(v) if fmt == "{:d}" else v)
            ci = r.get(f"{c}_ci")
            if ci is not None and isinstance(ci, float) and not np.isnan(ci):
                text += f" ±{ci / 1e9:.2g}" if fmt == "gb" else " ±" + fmt.format(ci).lstrip("±")
            row.append(text)
        cells.append(row)
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(SHOWN))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def write_chosen(sweep_dir, chosen: pd.Series, path, constraints: dict) -> Path:
    """The chosen point's resolved scenario, with a header saying where it came from."""
    src = Path(sweep_dir) / "points" / str(chosen["hash"]) / "scenario.yaml"
    if not src.exists():
        raise ChooseError(f"{src} is missing: the sweep's point directory was removed; rerun the sweep")
    out = Path(path)
    header = (f"# Chosen by `emoe choose` from {Path(sweep_dir).resolve()} point {chosen['hash']} "
              f"({chosen['label']}); constraints {json.dumps(constraints)}\n")
    out.write_text(header + src.read_text())
    return out
