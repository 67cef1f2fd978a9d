"""A run's timeline in the Chrome trace event format (opens in Perfetto or chrome://tracing).

Built from a results directory, so a simulation and a replay (same schema; the replay's
times are the wall clock's) give the same picture and can be opened side by side:
- thread "engine steps": one slice per engine step (tokens, decode and prefill tokens,
  experts active and loaded in its args);
- counters per step: host-link busy time and stall time (ms), requests running and
  waiting, expert and KV memory (MB);
- one async track per request: queued (arrival -> admission), prefill (admission ->
  first token), decode (first token -> finish); admissions and finishes as instants.
- with layers (`emoe timeline --layers`, simulations only): thread "layers" holds each
  layer's attention, expert compute and stall, and thread "host link" each copy (demand,
  streamed through staging, or prefetch; layer and expert). The results keep steps, not
  layers, so these come from simulating the run again (same scenario and seed: the same
  steps) with the cost model recording per layer inside a window. A replay records them
  as it runs, on its wall clock (layers.csv; on CUDA from timing events).

Format: the JSON object form, {"traceEvents": [...]}, timestamps in microseconds
(https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from traces.atomic import write_text
from traces.errors import UserError

US = 1e6
STEPS, SCHED, LAYERS, LINK = 1, 2, 3, 4          # thread ids


def chrome_trace(timeline, requests, meta: dict, window: tuple[float, float] | None = None,
                 layers: list[dict] | None = None) -> dict:
    """The trace events of one run (timeline and requests: the results tables).
    window: (start_s, end_s), only what overlaps it; layers: per-layer events (layer_events)."""
    lo, hi = window or (-math.inf, math.inf)
    engine = meta.get("engine", "sim")
    pid = 1
    ev: list[dict] = [
        _meta("process_name", pid, 0, f"emoe {engine}" + (f" ({meta.get('device')})" if meta.get("device") else "")),
        _meta("thread_name", pid, STEPS, "engine steps"),
        _meta("thread_name", pid, SCHED, "admissions and finishes"),
    ]
    tl = timeline[(timeline.t_s + timeline.step_s >= lo) & (timeline.t_s <= hi)]
    for row in tl.itertuples(index=False):
        ts = row.t_s * US
        kind = "prefill" if row.prefill_tokens else "decode"
        ev.append(dict(name=f"{kind} step", cat="step", ph="X", ts=ts, dur=row.step_s * US, pid=pid, tid=STEPS,
                       args=dict(tokens=int(row.tokens), decode_tokens=int(row.decode_tokens),
                                 prefill_tokens=int(row.prefill_tokens), requests=int(row.batch_requests),
                                 active_experts=int(row.active_experts), expert_loads=int(row.expert_loads))))
        ev.append(dict(name="host link", ph="C", ts=ts, pid=pid,
                       args=dict(busy_ms=row.link_busy_s * 1e3, stall_ms=row.stall_s * 1e3)))
        ev.append(dict(name="requests", ph="C", ts=ts, pid=pid,
                       args=dict(running=int(row.running), waiting=int(row.waiting))))
        ev.append(dict(name="memory MB", ph="C", ts=ts, pid=pid,
                       args=dict(experts=row.mem_experts / 1e6, kv=row.mem_kv / 1e6)))
    for i, r in enumerate(requests.itertuples(index=False)):
        end = r.finish_s if _num(r.finish_s) else None
        if r.arrival_s > hi or (end is not None and end < lo):
            continue
        phases = [("queued", r.arrival_s, r.admitted_s), ("prefill", r.admitted_s, r.first_token_s),
                  ("decode", r.first_token_s, r.finish_s)]
        for name, a, b in phases:
            if _num(a) and _num(b):
                args = dict(request=str(r.request_id), task=str(r.task))
                ev.append(dict(name=name, cat="request", ph="b", id=i, ts=a * US, pid=pid, tid=SCHED, args=args))
                ev.append(dict(name=name, cat="request", ph="e", id=i, ts=b * US, pid=pid, tid=SCHED))
        if _num(r.admitted_s):
            ev.append(dict(name=f"admit {r.request_id}", ph="i", s="t", ts=r.admitted_s * US, pid=pid, tid=SCHED))
        if end is not None:
            ev.append(dict(name=f"finish {r.request_id}", ph="i", s="t", ts=end * US, pid=pid, tid=SCHED))
    if layers is not None:
        ev += [_meta("thread_name", pid, LAYERS, "layers"), _meta("thread_name", pid, LINK, "host link")]
        for e in layers:
            if e["end_s"] < lo or e["start_s"] > hi:
                continue
            where = "" if e["layer"] is None else f"L{e['layer']} "
            name = where + e["kind"] + ("" if e["expert"] is None else f" E{e['expert']}")
            ev.append(dict(name=name, cat=e["kind"], ph="X", ts=e["start_s"] * US,
                           dur=(e["end_s"] - e["start_s"]) * US, pid=pid,
                           tid=LINK if e["kind"].endswith("copy") else LAYERS,
                           args=dict(layer=e["layer"], expert=e["expert"])))
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"engine": engine, "code_version": meta.get("code_version"), "seed": meta.get("seed")}}


def layer_events(results_dir, timeline, window: tuple[float, float]) -> list[dict]:
    """Each layer's compute and each copy of the steps starting in `window`, from simulating the
    results directory's scenario again up to the window's end (step by step: decode runs do
    not walk layers). Those steps are checked against the recorded timeline."""
    from sim.engine import Engine
    from sim.run import build
    from sim.scenario import load_scenario
    from sim.workload import build_requests
    sc = load_scenario(Path(results_dir) / "scenario.yaml")
    limit = sc["limits"].get("max_sim_time_s") or float("inf")
    sc["limits"] = {**sc["limits"], "decode_runs": False, "max_sim_time_s": min(limit, window[1] + 1e-9)}
    parts = build(sc)
    eng = Engine(*parts[:2], parts.trace, build_requests(sc, parts.trace), parts.policy, parts.scheduler,
                 sc["limits"])
    eng.cost.record, eng.cost.record_window = [], window
    eng.run()
    again = eng.timeline.columns()["t_s"]
    n = len(again)
    if n > len(timeline) or not np.allclose(again, timeline.t_s.to_numpy()[:n], rtol=1e-9, atol=1e-9):
        raise UserError(f"{results_dir}: simulating its scenario again does not give its first {n} steps "
                        "(was it written by another emoe version, or did an input file change?); "
                        "run it again with `emoe run` first")
    return eng.cost.record


def replayed_layer_events(results_dir) -> list[dict]:
    """A replay's per-layer events, measured on its wall clock (layers.csv)."""
    f = Path(results_dir) / "layers.csv"
    if not f.exists():
        raise UserError(f"{results_dir}: this replay has no layers.csv (replays before per-layer events were "
                        "recorded do not); replay the scenario again to get them")
    import pandas as pd
    ev = pd.read_csv(f)
    ev["layer"] = ev.layer.astype("Int64")
    ev["expert"] = ev.expert.astype("Int64")
    return [dict(kind=r.kind, layer=None if pd.isna(r.layer) else int(r.layer),
                 expert=None if pd.isna(r.expert) else int(r.expert), start_s=float(r.start_s), end_s=float(r.end_s))
            for r in ev.itertuples(index=False)]


def write_chrome_trace(results_dir, out=None, window=None, layers: bool = False) -> Path:
    """Write the results directory's timeline as Chrome trace JSON (default:
    RESULTS_DIR/timeline.trace.json); returns its path. layers: add per-layer events
    (simulations only; window defaults to the first 20 steps)."""
    from sim.results import load_results
    res = load_results(results_dir)
    meta_file = Path(results_dir) / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    out = Path(out) if out is not None else Path(results_dir) / "timeline.trace.json"
    per_layer = None
    if layers:
        tl = res["timeline"]
        if tl.empty:
            raise UserError(f"{results_dir}: the timeline has no steps")
        if window is None:
            last = tl.iloc[min(19, len(tl) - 1)]
            window = (float(tl.t_s.iloc[0]), float(last.t_s + last.step_s))
        per_layer = (layer_events(results_dir, tl, window) if meta.get("engine", "sim") == "sim"
                     else replayed_layer_events(results_dir))
    trace = chrome_trace(res["timeline"], res["requests"], meta, window, per_layer)
    write_text(out, json.dumps(trace, allow_nan=False))
    return out


def _meta(name: str, pid: int, tid: int, value: str) -> dict:
    return dict(name=name, ph="M", pid=pid, tid=tid, args=dict(name=value))


def _num(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
