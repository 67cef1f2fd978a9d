"""Two traces' routing statistics side by side, each with a verdict against a stated tolerance.

Many statistics depend on a trace's shape (how many requests, how long): JS
divergences and per-request NMI carry small-sample bias, inter-prompt correlation
grows with length. So a large trace is compared with a small one at the small
one's shape: its statistics are averaged over consecutive groups of as many
requests as the small one has (`group_size`), which is also how 30 synthetic
replicas give the spread of a synthetic profile at a real trace's shape.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from traces.errors import UserError
from traces.format import Trace, load_trace
from traces.realdata import REFERENCES
from traces.stats import summary_stats

TOLERANCE = 0.15   # relative; README "Synthetic traces and their calibration" states where it is not met

# (label, key in the flat statistics) in the order they print.
ROWS = [
    ("per-request Gini of expert counts", "request_gini"),
    ("effective experts per request and layer", "effective_experts"),
    ("NMI of top-1, layer distance 1", "nmi_1"),
    ("NMI of top-1, layer distance 2", "nmi_2"),
    ("NMI of top-1, layer distance 4", "nmi_4"),
    ("NMI of top-1, layer distance 8", "nmi_8"),
    ("reuse at token distance 1", "reuse_1"),
    ("reuse at token distance 2", "reuse_2"),
    ("reuse at token distance 4", "reuse_4"),
    ("reuse at token distance 8", "reuse_8"),
    ("reuse at token distance 16", "reuse_16"),
    ("reuse at token distances 4-16", "reuse_4_16"),
    ("reuse at layer 0", "reuse_first_layer"),
    ("reuse at the last layers", "reuse_last_layers"),
    ("median top-1 gate", "gate_median"),
    ("share of top-1 gates > 0.9", "gate_top1_over_0_9"),
    ("JS prompt vs decode (bits)", "prompt_decode_divergence"),
    ("JS between tasks (bits)", "specialisation"),
    ("inter-prompt correlation", "inter_prompt_correlation"),
    ("pooled Gini per layer", "gini"),
    ("top-k share", "top_share"),
]


def flatten(s: dict) -> dict:
    """The compared statistics from a `trace_stats`/`summary_stats` dict (or a flat one)."""
    out = {}
    for key in ("request_gini", "effective_experts", "reuse_first_layer", "reuse_last_layers", "gate_top1_over_0_9",
                "prompt_decode_divergence", "specialisation", "inter_prompt_correlation", "gini", "top_share"):
        if key in s:
            out[key] = s[key]
    for d, v in (s.get("nmi_by_distance") or {}).items():
        out[f"nmi_{d}"] = v
    reuse = s.get("reuse_by_distance") or {}
    for d, v in reuse.items():
        out[f"reuse_{d}"] = v
    if all(str(d) in reuse for d in (4, 8, 16)):
        out["reuse_4_16"] = float(np.mean([reuse[str(d)] for d in (4, 8, 16)]))
    if "0.5" in (s.get("gate_quantiles") or {}):
        out["gate_median"] = s["gate_quantiles"]["0.5"]
    for key, _ in ((k, None) for _, k in ROWS):   # already-flat input (a reference file)
        if key in s and key not in out:
            out[key] = s[key]
    return {k: _num(v) for k, v in out.items()}


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def grouped_stats(t: Trace, tokens: str = "all", group_size: int | None = None) -> dict:
    """Flat statistics averaged over consecutive groups of `group_size` requests
    (None or >= the trace's requests: the whole trace). Also returns the spread."""
    n = t.n_requests
    if not group_size or group_size >= n:
        flat = flatten(summary_stats(t, tokens))
        flat["groups"] = 1
        return flat
    per = [flatten(summary_stats(t.subset(np.arange(g0, g0 + group_size)), tokens))
           for g0 in range(0, n - group_size + 1, group_size)]
    keys = per[0].keys()
    out = {}
    for k in keys:
        vals = np.array([p[k] for p in per], dtype=float)
        ok = vals[~np.isnan(vals)]
        out[k] = float(ok.mean()) if len(ok) else float("nan")
        out[f"{k}_sd"] = float(ok.std()) if len(ok) > 1 else float("nan")
    out["groups"] = len(per)
    return out


def load_side(path, tokens: str):
    """A trace (.npz), a statistics JSON (`trace stats --json`), or `reference:NAME` (real
    figures in traces/realdata.py): (flat stats, requests, trace or None, label)."""
    if str(path).startswith("reference:"):
        name = str(path).split(":", 1)[1]
        if name not in REFERENCES:
            raise UserError(f"unknown reference '{name}'; known: {', '.join(REFERENCES)}")
        ref = REFERENCES[name]
        if ref["tokens"] != tokens:
            raise UserError(f"reference '{name}' was measured on {ref['tokens']} tokens; add --tokens {ref['tokens']}")
        return dict(ref["stats"]), ref["requests"], None, f"reference:{name}"
    path = Path(path)
    if path.suffix == ".json":
        if not path.exists():
            raise UserError(f"'{path}' does not exist; write one with `emoe trace stats TRACE --json OUT`")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        stats = doc.get("stats", doc)
        return flatten(stats), doc.get("requests", stats.get("requests")), None, doc.get("name", path.name)
    t = load_trace(path)
    return None, t.n_requests, t, path.name


def compare(a: dict, b: dict, tol: float = TOLERANCE) -> list[dict]:
    """One row per statistic both sides have: values, relative difference (a - b) / |b|, verdict."""
    rows = []
    for label, key in ROWS:
        va, vb = a.get(key, float("nan")), b.get(key, float("nan"))
        if math.isnan(va) and math.isnan(vb):
            continue
        if math.isnan(va) or math.isnan(vb):
            rel, verdict = float("nan"), "n/a"
        else:
            rel = (va - vb) / abs(vb) if vb else (0.0 if va == vb else float("inf"))
            verdict = "ok" if abs(rel) <= tol else "differs"
        rows.append(dict(statistic=label, key=key, a=va, b=vb, a_sd=a.get(f"{key}_sd", float("nan")),
                         relative_difference=rel, verdict=verdict))
    return rows


def compare_paths(path_a, path_b, tokens: str = "all", tol: float = TOLERANCE, group_size="auto") -> dict:
    """Compare two traces or statistics files; the larger trace is grouped to the other's shape."""
    fa, ra, ta, la = load_side(path_a, tokens)
    fb, rb, tb, lb = load_side(path_b, tokens)
    if group_size == "auto":
        group_size = rb if (ta is not None and rb and ra and ra >= 2 * rb) else None
    if ta is not None:
        fa = grouped_stats(ta, tokens, group_size)
    if tb is not None:
        fb = grouped_stats(tb, tokens, None)
    return dict(a=la, b=lb, tokens=tokens, tolerance=tol, group_size=group_size, groups=fa.get("groups", 1),
                requests=dict(a=ra, b=rb), rows=compare(fa, fb, tol))


def format_report(rep: dict) -> str:
    lines = [f"A: {rep['a']} ({rep['requests']['a']} requests"
             + (f", averaged over {rep['groups']} groups of {rep['group_size']}" if rep["group_size"] else "") + ")",
             f"B: {rep['b']} ({rep['requests']['b']} requests); {rep['tokens']} tokens; "
             f"verdict: |A - B| / |B| <= {rep['tolerance']:.0%}",
             f"{'statistic':42s}{'A':>10s}{'(sd)':>8s}{'B':>10s}{'rel.':>9s}  verdict"]
    for r in rep["rows"]:
        sd = f"{r['a_sd']:.3f}" if not math.isnan(r["a_sd"]) else ""
        rel = f"{r['relative_difference']:+.0%}" if not math.isnan(r["relative_difference"]) else ""
        lines.append(f"{r['statistic']:42s}{r['a']:10.3f}{sd:>8s}{r['b']:10.3f}{rel:>9s}  {r['verdict']}")
    n_bad = sum(r["verdict"] == "differs" for r in rep["rows"])
    lines.append(f"{len(rep['rows']) - n_bad} of {len(rep['rows'])} statistics within tolerance"
                 + (f"; {n_bad} differ" if n_bad else ""))
    return "\n".join(lines)
