"""Standard figures from sweep tables and results directories (PNG and SVG).

Every function takes data (a sweep table DataFrame, or {label: requests DataFrame})
and returns a matplotlib Figure, so notebooks call them directly; `save` writes
both formats. `emoe plot` wraps them for the command line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.errors import UserError

GB = 1e9


def _plt():
    # No backend switching here: notebooks keep their inline backend; the CLI sets
    # MPLBACKEND=Agg, and matplotlib falls back to Agg on machines without a display.
    import matplotlib.pyplot as plt
    return plt


def save(fig, out_dir, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(p)
    _plt().close(fig)
    return paths


def _done(t: pd.DataFrame) -> pd.DataFrame:
    t = t[t.status == "done"] if "status" in t else t
    if "label" not in t:
        raise UserError("the table has no 'label' column; make it with `emoe sweep`")
    return t


def _by_label(t):
    return sorted(t.groupby("label"), key=lambda kv: kv[0])


def _series(t: pd.DataFrame, x: str):
    """(name, points) per line of a figure drawn against x: one per policy label and per value
    of any other swept parameter (seeds aside), so no line averages silently over a parameter
    the figure does not show; points: one row per x, each metric's mean over seeds and, with
    several seeds, its 95% interval as `<metric>_ci`."""
    from sim.choose import _config_columns
    swept = [c for c in _config_columns(t) if c != "label"] if "hash" in t else []
    hidden = [c for c in swept if t.groupby(["label", x])[c].nunique(dropna=False).max() > 1]
    for key, g in t.groupby(["label", *hidden], sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        name = str(key[0]) + "".join(f", {c}={v}" for c, v in zip(hidden, key[1:]))
        yield name, _points(g, x)


def _points(g: pd.DataFrame, x: str) -> pd.DataFrame:
    from sim.choose import _t95
    by = g.groupby(x)
    out = by.mean(numeric_only=True)
    n = by.size()
    sd = by.std(numeric_only=True, ddof=1)
    for c in ("e2e_mean_s", "e2e_p99_s", "slo_attainment", "peak_memory_bytes"):
        if c in sd:
            out[f"{c}_ci"] = [_t95(int(k)) * v / np.sqrt(k) if k >= 2 else np.nan for k, v in zip(n, sd[c])]
    out[x] = out.index
    return out.reset_index(drop=True).sort_values(x)


def _errorbar(ax, x, y, ci, color, scale=1.0, share=False):
    """95% intervals as error bars; a share's (share=True) end at 0 and 1, as choose prints them."""
    if ci is not None and np.isfinite(ci).any():
        ci = np.nan_to_num(np.asarray(ci, dtype=float))
        if share:
            y_ = np.asarray(y, dtype=float)
            ci = np.stack([np.minimum(ci, np.maximum(y_, 0.0)), np.minimum(ci, np.maximum(1.0 - y_, 0.0))])
        ax.errorbar(x, y * scale, yerr=ci * scale, fmt="none", ecolor=color, elinewidth=0.8, capsize=2)


def memory_vs_experts(t: pd.DataFrame):
    """Peak memory (total and the expert part) vs share of experts loaded, per policy."""
    plt = _plt()
    t = _done(t)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, g in _series(t, "policy_capacity"):
        line, = ax.plot(g.policy_capacity * 100, g.peak_memory_bytes / GB, marker="o", label=label)
        _errorbar(ax, g.policy_capacity * 100, g.peak_memory_bytes, g.get("peak_memory_bytes_ci"),
                  line.get_color(), 1 / GB)
        ax.plot(g.policy_capacity * 100, g.peak_experts_bytes / GB, ls=":", color=line.get_color())
    ax.set_xlabel("experts kept on the GPU (% of all)")
    ax.set_ylabel("peak GPU memory (GB); dotted: experts only")
    ax.set_title("Memory vs share of experts loaded")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def quality_column(t: pd.DataFrame) -> tuple[str, str]:
    """The quality figure a ranking shows: the calibrated estimate when the table has one
    (with its provenance), else routing fidelity, labelled as what it is."""
    if "estimated_quality" in t and t.estimated_quality.notna().any():
        src = ""
        if "estimated_quality_source" in t and t.estimated_quality_source.notna().any():
            src = str(t.estimated_quality_source.dropna().iloc[0])
        return "estimated_quality", f"est. quality (%)\n{_wrap(src)}" if src else "est. quality (%)"
    return "routing_fidelity", "routing fidelity (% of gate mass served; no quality calibration)"


def _wrap(text: str, width: int = 60) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def quality_vs_memory(t: pd.DataFrame):
    """Estimated quality (solid) and routing fidelity (dotted) vs peak memory, per policy."""
    plt = _plt()
    t = _done(t)
    col, qlabel = quality_column(t)
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    for label, g in _by_label(t):
        g = g.sort_values("peak_memory_bytes")
        line, = ax.plot(g.peak_memory_bytes / GB, g[col] * 100, marker="o", label=label)
        if col != "routing_fidelity":
            ax.plot(g.peak_memory_bytes / GB, g.routing_fidelity * 100, ls=":", color=line.get_color())
    ax.set_xlabel("peak GPU memory (GB)")
    ax.set_ylabel(qlabel if col == "routing_fidelity" else "%; dotted: routing fidelity")
    ax.set_title("Quality vs memory" + ("" if col == "routing_fidelity" else f"\n{qlabel}"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def latency_cdf(requests: dict[str, pd.DataFrame], metric: str = "e2e_s"):
    """CDF of per-request latency, one line per run (label -> requests table)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, req in requests.items():
        x = np.sort(req.loc[req.completed, metric].to_numpy())
        ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), label=label)
    ax.set_xscale("log")
    ax.set_xlabel({"e2e_s": "end-to-end latency (s)", "ttft_s": "time to first token (s)",
                   "tpot_s": "time per output token (s)"}.get(metric, metric))
    ax.set_ylabel("share of requests")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def vs_rate(t: pd.DataFrame):
    """SLO attainment, mean and p99 end-to-end latency vs arrival rate."""
    plt = _plt()
    t = _done(t)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    col, qlabel = quality_column(t)
    for label, g in _series(t, "arrival_rate"):
        label = f"{label} (q {g[col].mean():.0%})"   # quality beside latency in the legend
        line, = axes[0].plot(g.arrival_rate, g.e2e_mean_s, marker="o", label=f"{label} mean")
        axes[0].plot(g.arrival_rate, g.e2e_p99_s, ls="--", color=line.get_color(), label=f"{label} p99")
        axes[1].plot(g.arrival_rate, g.slo_attainment * 100, marker="o", label=label)
        _errorbar(axes[0], g.arrival_rate, g.e2e_mean_s, g.get("e2e_mean_s_ci"), line.get_color())
        _errorbar(axes[1], g.arrival_rate, g.slo_attainment, g.get("slo_attainment_ci"), line.get_color(), 100,
                  share=True)
    axes[0].set_xlabel("arrival rate (requests/s)")
    axes[0].set_ylabel("end-to-end latency (s)")
    axes[0].set_xscale("log")
    axes[0].set_title("Latency vs load")
    axes[1].set_xlabel("arrival rate (requests/s)")
    axes[1].set_ylabel("SLO attainment (%)")
    axes[1].set_xscale("log")
    axes[1].set_title("SLO attainment vs load")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.text(0.01, -0.02, f"q: {qlabel.replace(chr(10), ' ')}", fontsize=7)
    return fig


def vs_interval(t: pd.DataFrame):
    """Routing fidelity, latency and bytes moved vs predictor interval p."""
    plt = _plt()
    t = _done(t)
    col = "policy.interval"
    if col not in t:
        raise UserError("the table has no 'policy.interval' column: sweep policy.interval")
    qcol, qlabel = quality_column(t)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, g in _series(t, col):
        line, = axes[0].plot(g[col], g[qcol] * 100, marker="o", label=name)
        if qcol != "routing_fidelity":
            axes[0].plot(g[col], g.routing_fidelity * 100, ls=":", marker=".", color=line.get_color())
        axes[1].plot(g[col], g.e2e_mean_s, marker="o", color=line.get_color())
        _errorbar(axes[1], g[col], g.e2e_mean_s, g.get("e2e_mean_s_ci"), line.get_color())
        axes[2].plot(g[col], g.bytes_loaded / GB, marker="o", color=line.get_color())
    axes[0].set_ylabel(qlabel + ("; dotted: routing fidelity" if qcol != "routing_fidelity" else ""), fontsize=7)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("mean end-to-end latency (s)")
    axes[2].set_ylabel("expert bytes moved (GB)")
    for ax in axes:
        ax.set_xlabel("predictor interval p (prompts)")
        ax.grid(alpha=0.3)
    fig.suptitle("eMoE vs predictor interval")
    return fig


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Rows not dominated by another (all columns: smaller is better)."""
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(points <= points[i], axis=1) & np.any(points < points[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def pareto(t: pd.DataFrame, slo_attainment: float | None = None, min_quality: float | None = None,
           chosen: str | None = None):
    """Memory vs latency, colour = estimated quality (or fidelity). Points that miss the SLO
    attainment or quality floor (when given) are grey crosses; the Pareto-optimal feasible points
    on (memory, latency, quality) are ringed and labelled with policy, capacity and point hash.
    A table from `emoe choose` (with its `feasible` and `pareto` columns) is drawn as chosen, the
    chosen point (its hash) starred; a sweep table with several seeds is pooled first, one point
    per configuration, as `emoe choose` compares them (not each configuration's luckiest seed)."""
    plt = _plt()
    t = _done(t).reset_index(drop=True)
    if "feasible" not in t and "seed" in t and t.seed.nunique() > 1:
        from sim.choose import pool_seeds
        source = t.estimated_quality_source.dropna() if "estimated_quality_source" in t else pd.Series(dtype=str)
        t = pool_seeds(t, Path(".")).assign(estimated_quality_source=source.iloc[0] if len(source) else None)
    col, qlabel = quality_column(t)
    if "feasible" in t and "pareto" in t:
        feasible, front = t.feasible.to_numpy(bool), t.pareto.to_numpy(bool)
    else:
        feasible = np.ones(len(t), dtype=bool)
        if slo_attainment is not None:
            feasible &= (t.slo_attainment >= slo_attainment).to_numpy()
        if min_quality is not None:
            feasible &= (t[col].fillna(1.0) >= min_quality).to_numpy()
        pts = np.stack([t.peak_memory_bytes, t.e2e_mean_s, -t[col]], axis=1)
        front = np.zeros(len(t), dtype=bool)
        front[np.flatnonzero(feasible)[pareto_mask(pts[feasible])]] = True
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    f = feasible
    sc = ax.scatter(t.peak_memory_bytes[f] / GB, t.e2e_mean_s[f], c=t[col][f] * 100, cmap="viridis", s=36,
                    vmin=float(t[col].min() * 100), vmax=float(t[col].max() * 100))
    if (~f).any():
        floors = [f"SLO >= {slo_attainment:.0%}" if slo_attainment is not None else "",
                  f"quality >= {min_quality:.0%}" if min_quality is not None else ""]
        ax.scatter(t.peak_memory_bytes[~f] / GB, t.e2e_mean_s[~f], marker="x", color="0.6", s=30,
                   label="infeasible (" + ", ".join(x for x in floors if x) + ")")
    if "e2e_mean_s_ci" in t and t.e2e_mean_s_ci.notna().any():   # seeds pooled: 95% intervals
        ax.errorbar(t.peak_memory_bytes / GB, t.e2e_mean_s, yerr=t.e2e_mean_s_ci.fillna(0), fmt="none",
                    ecolor="0.5", elinewidth=0.8, capsize=2, label="95% interval over seeds")
    name = "quality" if col != "routing_fidelity" else "fidelity"
    ax.scatter(t.peak_memory_bytes[front] / GB, t.e2e_mean_s[front], s=140, facecolors="none", edgecolors="red",
               label="Pareto set, as `emoe choose` printed it" if "pareto" in t
               else f"Pareto front (memory, latency, {name})")
    for i in np.flatnonzero(front):
        cap = t.policy_capacity[i] if "policy_capacity" in t else np.nan
        text = t.label[i] + (f" cap={cap:g}" if pd.notna(cap) else "")
        text += f" #{str(t.hash[i])[:6]}" if "hash" in t else ""
        ax.annotate(text, (t.peak_memory_bytes[i] / GB, t.e2e_mean_s[i]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    if chosen is not None and (t.hash.astype(str) == str(chosen)).any():
        i = int(np.flatnonzero(t.hash.astype(str) == str(chosen))[0])
        ax.scatter([t.peak_memory_bytes[i] / GB], [t.e2e_mean_s[i]], marker="*", s=220, color="red", zorder=5,
                   label="chosen")
    cb = fig.colorbar(sc)
    cb.set_label(qlabel, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("peak GPU memory (GB)")
    ax.set_ylabel("mean end-to-end latency (s)")
    ax.set_title(f"Memory / latency / {name} trade-off")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def timeline(results: dict, window: tuple[float, float] | None = None, title: str = ""):
    """A window of one run's timeline (a results directory, simulated or replayed): each
    engine step as a bar (prefill steps dark), the host link's busy time and the stall per
    step, and requests running and waiting. The same data as `emoe timeline`'s Chrome trace."""
    plt = _plt()
    tl = results["timeline"]
    if tl.empty:
        raise UserError("the run has no engine step to draw (every request rejected?)")
    if window is not None:
        tl = tl[(tl.t_s + tl.step_s >= window[0]) & (tl.t_s <= window[1])]
    if tl.empty:
        raise UserError(f"no engine step in the window {window}; the run spans "
                        f"0-{results['timeline'].t_s.max() + results['timeline'].step_s.iloc[-1]:.3f} s")
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 6.5), sharex=True, height_ratios=[1, 1.3, 1.3])
    prefill = tl.prefill_tokens > 0
    for mask, color, label in ((~prefill, "tab:blue", "decode step"), (prefill, "tab:purple", "step with prefill")):
        if mask.any():
            a1.broken_barh(list(zip(tl.t_s[mask], tl.step_s[mask])), (0.1, 0.8), facecolor=color, label=label,
                           edgecolor="white", linewidth=0.4)    # white edges: where one step ends
    a1.set_yticks([])
    a1.set_ylabel("steps")
    a1.legend(fontsize=8, loc="upper right")
    a2.step(tl.t_s, tl.step_s * 1e3, where="post", color="0.4", lw=0.8, label="step time")
    a2.step(tl.t_s, tl.link_busy_s * 1e3, where="post", color="tab:orange", lw=2.2, alpha=0.7, label="host link busy")
    a2.step(tl.t_s, tl.stall_s * 1e3, where="post", color="tab:red", lw=0.8, ls="--", label="stall (layers waiting)")
    a2.set_ylabel("per step (ms)")
    a2.legend(fontsize=8, loc="upper right")
    a3.step(tl.t_s, tl.running, where="post", label="running")
    a3.step(tl.t_s, tl.waiting, where="post", label="waiting")
    a3.set_ylabel("requests")
    a3.set_xlabel("time (s)")
    a3.legend(fontsize=8, loc="upper right")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    if window is not None:
        a3.set_xlim(*window)
    fig.suptitle(title or "Timeline", fontsize=10)
    return fig


def sim_vs_replay(comparison: pd.DataFrame):
    """Bar chart of simulated vs replayed metrics (rows: metric; columns: sim, replay)."""
    plt = _plt()
    c = comparison.dropna(subset=["sim", "replay"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(c) + 1.5))
    y = np.arange(len(c))
    ratio = c.sim / c.replay.replace(0, np.nan)
    ax.barh(y, ratio, color=np.where((ratio - 1).abs() <= 0.15, "tab:green", "tab:red"))
    ax.axvline(1, color="k", lw=1)
    ax.set_yticks(y, c.index)
    ax.set_xlabel("simulated / replayed (1 = exact; green within 15%)")
    ax.set_title("Simulator vs replay")
    ax.grid(alpha=0.3, axis="x")
    return fig


def auto(table: pd.DataFrame, out_dir) -> list[Path]:
    """Every standard figure this table supports."""
    written = []
    t = _done(table)
    varied = {c for c in ("policy_capacity", "arrival_rate", "policy.interval") if c in t and t[c].nunique() > 1}
    if "policy_capacity" in varied:
        written += save(memory_vs_experts(t), out_dir, "memory_vs_experts")
        written += save(quality_vs_memory(t), out_dir, "quality_vs_memory")
    if "arrival_rate" in varied:
        written += save(vs_rate(t), out_dir, "latency_vs_rate")
    if "policy.interval" in varied:
        written += save(vs_interval(t), out_dir, "vs_interval")
    if len(t) >= 2:
        written += save(pareto(t), out_dir, "pareto")
    return written


# The figures `emoe plot --kind NAME` draws from a sweep table (`auto`: every one it supports).
KINDS = {"memory": memory_vs_experts, "quality": quality_vs_memory, "rate": vs_rate, "interval": vs_interval,
         "pareto": pareto}
