"""A run's timeline in the Chrome trace event format (opens in Perfetto or chrome://tracing).

Built from a results directory, so a simulation and a replay (same schema; the replay's
times are the wall clock's) give the same picture and can be opened side by side:
- thread "engine steps": one slice per engine step (tokens, decode and prefill tokens,
  experts active and loaded in its args);
- counters per step: host-link busy time and stall time (ms), requests running and
  waiting, expert and KV memory (MB);
- one async track per request: queued (arrival -> admission), prefill (admission ->
  first token), decode (first token -> finish); admissions and finishes as instants.
What it does not show yet: each layer's compute and each copy on the link separately
(the timeline records them per step, summed), so a step's stall is a counter, not a
placed slice.

Format: the JSON object form, {"traceEvents": [...]}, timestamps in microseconds
(https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from traces.atomic import write_text

US = 1e6
STEPS, SCHED = 1, 2          # thread ids


def chrome_trace(timeline, requests, meta: dict, window: tuple[float, float] | None = None) -> dict:
    """The trace events of one run (timeline and requests: the results tables).
    window: (start_s, end_s), only what overlaps it."""
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
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"engine": engine, "code_version": meta.get("code_version"), "seed": meta.get("seed")}}


def write_chrome_trace(results_dir, out=None, window=None) -> Path:
    """Write the results directory's timeline as Chrome trace JSON (default:
    RESULTS_DIR/timeline.trace.json); returns its path."""
    from sim.results import load_results
    res = load_results(results_dir)
    meta_file = Path(results_dir) / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    out = Path(out) if out is not None else Path(results_dir) / "timeline.trace.json"
    trace = chrome_trace(res["timeline"], res["requests"], meta, window)
    write_text(out, json.dumps(trace, allow_nan=False))
    return out


def _meta(name: str, pid: int, tid: int, value: str) -> dict:
    return dict(name=name, ph="M", pid=pid, tid=tid, args=dict(name=value))


def _num(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
