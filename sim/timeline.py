"""The engine's timeline: one row per engine step, its fields the timeline table's columns."""
from __future__ import annotations

from typing import NamedTuple


class TimelineRow(NamedTuple):
    t_s: float              # when the step started
    step_s: float           # its duration
    tokens: int
    batch_requests: int
    running: int
    waiting: int
    decode_tokens: int
    prefill_tokens: int
    mem_dense: float        # memory by part (bytes)
    mem_experts: float
    mem_kv: float
    mem_activations: float
    mem_predictor: float
    link_busy_s: float      # host link time spent on the step's copies
    stall_s: float          # compute waiting for copies
    expert_loads: int       # copies issued
    active_experts: int     # (layer, expert) pairs computing
    attn_ctx: float         # sum over tokens of the context attended to
    sampled: int            # requests that produced a token


TIMELINE_COLUMNS = TimelineRow._fields


def rows_from_columns(**columns: list) -> zip:
    """Rows of many steps given as one list per column (all columns, by name): plain tuples
    in column order, so a decode run's thousands of rows cost no per-row Python call."""
    missing = set(TIMELINE_COLUMNS) - set(columns)
    if missing or len(columns) != len(TIMELINE_COLUMNS):
        raise TypeError(f"timeline columns: missing {sorted(missing)}, unknown "
                        f"{sorted(set(columns) - set(TIMELINE_COLUMNS))}")
    return zip(*(columns[c] for c in TIMELINE_COLUMNS))
