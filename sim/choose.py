"""Choosing a policy from a sweep: constraints, a Pareto set, one chosen point.

A sweep's table holds one row per point (and per seed). Choosing:
0. policies are compared under one setting of everything else: a sweep that also varies
   the workload, hardware or limits needs `--at KEY=VALUE` for each such axis (a policy
   at 5 requests/s is no rival of one at 80), and configurations are compared on the
   seeds every one of them finished;
1. rows of one configuration run with several seeds are pooled (mean, and the 95%
   interval of the mean where there are at least two seeds);
2. a configuration is *feasible* when its SLO attainment and estimated quality meet
   the user's floors (quality beside latency: a point is never chosen on latency
   alone; an unknown quality meets no floor above 0) and it served the same requests
   as its rivals: a run that stopped at a limit, or rejected requests, with fewer
   requests finished than another configuration on the same seed, has its latency
   averaged over other requests (fewer, and the early ones), so it is left out;
3. the feasible *Pareto set* keeps the configurations no other feasible one beats on
   peak memory, mean end-to-end latency and estimated quality at once (and on the
   objective, when that is p99 latency or throughput);
4. the *chosen* one is the best of the Pareto set by the objective, ties broken by
   the others.
The chosen configuration's resolved scenario (from OUTPUT/points/<hash>/scenario.yaml)
is what `emoe replay` and `emoe confirm` run, so the replay runs what was simulated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

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
METRICS = [c for c, _, _ in SHOWN[5:]] + ["routing_fidelity"]
SHARES = ("slo_attainment", "estimated_quality")   # bounded by 0 and 1: so are their intervals
NOT_CONFIG = {"point", "hash", "seed", "seed_used", "status", "error"}
# Swept keys that make a configuration a different policy (the rest set the conditions it runs under)
POLICY_AXES = ("policy", "scheduler")


class ChooseError(UserError):
    """A user's mistake: a directory that is no sweep, no finished point, nothing feasible."""


@dataclass
class Choice:
    pooled: pd.DataFrame      # one row per configuration: metrics (mean), CI half-widths, feasibility
    pareto: pd.DataFrame      # the feasible Pareto set, best by the objective first
    chosen: pd.Series | None
    constraints: dict
    notes: list               # what was left out of the comparison, and why


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


def _is_policy_axis(column: str) -> bool:
    return column.split(".")[0] in POLICY_AXES


def _canon(v) -> str:
    """A swept value as comparable text: null, true/false, numbers by value (5 and 5.0 alike),
    dicts and lists as sorted JSON (a sweep table holds them as text; --at gives them as YAML)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, float, np.number)):
        return _number(float(v))
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    text = str(v).strip()
    if text[:1] in "{[":
        try:
            return json.dumps(json.loads(text), sort_keys=True)
        except ValueError:
            return text
    if text in ("True", "False"):
        return text.lower()
    try:
        return _number(float(text))
    except ValueError:
        return text


def _number(f: float) -> str:
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def _in_order(values) -> list[str]:
    """Numbers by value, then text."""
    def key(v):
        try:
            return (0, float(v), "")
        except ValueError:
            return (1, 0.0, v)
    return sorted(values, key=key)


def at_setting(t: pd.DataFrame, at: dict | None) -> pd.DataFrame:
    """The rows of one setting of the sweep's non-policy axes (workload, hardware, limits...).
    at: {key: value as YAML text} (null, true, 5, {process: batch} as the sweep file spells them)."""
    import shlex
    at = dict(at or {})
    context = [c for c in _config_columns(t) if c != "label" and not _is_policy_axis(c)]
    for key, value in at.items():
        if key not in context:
            raise ChooseError(f"--at {key}={value}: '{key}' is not a swept axis of this sweep other than the "
                              f"policy's; its axes: {', '.join(context) or 'none besides the policy'}")
        try:
            wanted = _canon(yamlio.safe_load(value))
        except yaml.YAMLError:     # not YAML: compare the text as given
            wanted = _canon(value)
        t = t[t[key].map(_canon) == wanted]
        if t.empty:
            raise ChooseError(f"--at {key}={value}: no finished point has {key} = {value}")
    varied = {c: _in_order(t[c].map(_canon).unique()) for c in context if c not in at
              and t[c].map(_canon).nunique() > 1}
    if varied:
        axes = "; ".join(f"{c} ({', '.join(v)})" for c, v in varied.items())
        first = next(iter(varied.items()))
        raise ChooseError(f"this sweep also varies {axes}: policies are compared under one setting of it; add "
                          f"--at {shlex.quote(f'{first[0]}={first[1][0]}')} (one --at per axis)")
    return t


def common_seeds(t: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    """The rows of the seeds every configuration finished (equal terms: the same arrival
    sequences and requests for every rival), and a note for what was dropped."""
    if "seed" not in t or t.seed.isna().all():
        return t, []
    keys = [t[k].astype(str) for k in _config_columns(t)]
    per = t.groupby(keys, sort=False, dropna=False).seed.agg(lambda s: frozenset(s.astype(str)))
    common = frozenset.intersection(*per.tolist())
    if not common:
        raise ChooseError("no seed was finished by every configuration, so none compares on equal terms; "
                          "run the sweep again (it resumes) to finish the failed points")
    if all(s == common for s in per):
        return t, []
    kept = t[t.seed.astype(str).isin(common)]
    return kept, [f"compared on seed(s) {', '.join(_in_order(common))}, the ones every configuration finished "
                  f"({len(t) - len(kept)} row(s) of other seeds left out)"]


def incomplete_rows(t: pd.DataFrame) -> pd.Series:
    """Rows that served fewer requests than another configuration on the same seed (a run
    stopped at a limit), or rejected more: their latency is over another set of requests."""
    done = pd.to_numeric(t.get("requests_completed", pd.Series(np.nan, index=t.index)), errors="coerce")
    rejected = pd.to_numeric(t.get("requests_rejected", pd.Series(0, index=t.index)), errors="coerce").fillna(0)
    seed = t.seed.astype(str) if "seed" in t else pd.Series("", index=t.index)
    return (done < done.groupby(seed).transform("max")) | (rejected > rejected.groupby(seed).transform("min"))


def pool_seeds(t: pd.DataFrame, sweep_dir: Path) -> pd.DataFrame:
    """One row per configuration: mean of each metric over seeds, 95% half-width as `<metric>_ci`."""
    keys = _config_columns(t)
    t = t.assign(_incomplete=incomplete_rows(t))
    rows = []
    for _, g in t.groupby([t[k].astype(str) for k in keys], sort=False, dropna=False):
        first = g.iloc[0]
        row = {"label": first.get("label", ""), "policy_capacity": first.get("policy_capacity", np.nan),
               "hash": first["hash"], "seeds": len(g), "hashes": ",".join(g.hash.astype(str)),
               "seed": first.get("seed", np.nan), "incomplete": bool(g["_incomplete"].any())}
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
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262,
             11: 2.228, 12: 2.201, 13: 2.179, 14: 2.160, 15: 2.145, 16: 2.131, 17: 2.120, 18: 2.110, 19: 2.101,
             20: 2.093, 21: 2.086, 22: 2.080, 23: 2.074, 24: 2.069, 25: 2.064, 26: 2.060, 27: 2.056, 28: 2.052,
             29: 2.048, 30: 2.045}
    # beyond 30 samples the normal quantile plus its first correction (within 0.003 of the true one)
    return table.get(n, 1.96 + 2.37 / (n - 1))


def choose(sweep_dir, slo_attainment: float = 0.0, min_quality: float = 0.0, max_memory_gb: float | None = None,
           objective: str = "memory", at: dict | None = None) -> Choice:
    if objective not in OBJECTIVES:
        raise ChooseError(f"--minimise/--maximise: unknown objective '{objective}'; choose from "
                          f"{', '.join(OBJECTIVES)}")
    for name, v in (("--slo-attainment", slo_attainment), ("--min-quality", min_quality)):
        if not 0.0 <= v <= 1.0:
            raise ChooseError(f"{name} must be a share in [0, 1], got {v}")
    d = Path(sweep_dir)
    table, notes = common_seeds(at_setting(load_table(d), at))
    pooled = pool_seeds(table, d)
    quality = pooled.estimated_quality
    # No calibration at all: nothing to constrain on. Some configurations without an estimate (no
    # request finished): unknown, which meets no floor above 0 and loses every comparison on quality.
    q = quality.fillna(1.0) if quality.isna().all() else quality
    feasible = (pooled.slo_attainment >= slo_attainment) & ((q >= min_quality) | (min_quality <= 0))
    if max_memory_gb is not None:
        feasible &= pooled.peak_memory_bytes <= max_memory_gb * 1e9
    for _, r in pooled[pooled.incomplete].iterrows():
        notes.append(f"{r.label} capacity {r.policy_capacity:g} (point {r['hash']}) left out: it finished fewer "
                     "requests than another configuration on the same seed (a limit stopped it), or rejected "
                     "more (KV space), so its latency is over other requests")
    feasible &= ~pooled.incomplete
    pooled["feasible"] = feasible
    pooled["pareto"] = False
    col, sign = OBJECTIVES[objective]
    idx = np.flatnonzero(feasible.to_numpy())
    if len(idx):
        dims = [pooled.peak_memory_bytes, pooled.e2e_mean_s, -q.fillna(-np.inf)]
        if col not in ("peak_memory_bytes", "e2e_mean_s", "estimated_quality"):
            dims.append(sign * pooled[col])        # p99 or throughput: a dimension of its own
        pts = np.stack([x.to_numpy(dtype=float)[idx] for x in dims], axis=1)
        pooled.loc[idx[pareto_mask(pts)], "pareto"] = True
    others = [c for c in ("peak_memory_bytes", "e2e_mean_s", "estimated_quality") if c != col]
    front = pooled[pooled.pareto].copy()
    front["_key"] = sign * front[col]
    front = front.sort_values(["_key"] + others, ascending=[True] + [c != "estimated_quality" for c in others])
    front = front.drop(columns="_key")
    chosen = front.iloc[0] if len(front) else None
    return Choice(pooled, front, chosen, dict(slo_attainment=slo_attainment, min_quality=min_quality,
                                              max_memory_gb=max_memory_gb, objective=objective, at=at or {}), notes)


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
                if c in SHARES and (v - ci < 0 or v + ci > 1):   # a share's interval ends at 0 and 1
                    text += f" ({fmt.format(max(v - ci, 0.0))}-{fmt.format(min(v + ci, 1.0))})"
                else:
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
    seeds = int(chosen.get("seeds", 1) or 1)
    of = (f"; this file is seed {chosen.get('seed')} of the {seeds} the printed means pool" if seeds > 1 else "")
    header = (f"# Chosen by `emoe choose` from {Path(sweep_dir).resolve()} point {chosen['hash']} "
              f"({chosen['label']}); constraints {json.dumps(constraints)}{of}\n")
    out.write_text(header + src.read_text())
    return out
