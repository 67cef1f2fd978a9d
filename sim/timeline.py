"""The engine's timeline: one row per engine step, its fields the timeline table's columns."""
from __future__ import annotations

from typing import NamedTuple, get_type_hints

import numpy as np


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
    prefill_ctx: float      # the part of attn_ctx that prompt-chunk tokens attend to


TIMELINE_COLUMNS = TimelineRow._fields


def rows_from_columns(**columns: list) -> zip:
    """Rows of many steps given as one list per column (all columns, by name): plain tuples
    in column order, so a decode run's thousands of rows cost no per-row Python call."""
    missing = set(TIMELINE_COLUMNS) - set(columns)
    if missing or len(columns) != len(TIMELINE_COLUMNS):
        raise TypeError(f"timeline columns: missing {sorted(missing)}, unknown "
                        f"{sorted(set(columns) - set(TIMELINE_COLUMNS))}")
    return zip(*(columns[c] for c in TIMELINE_COLUMNS))


_INT_COLUMNS = [i for i, c in enumerate(TIMELINE_COLUMNS) if get_type_hints(TimelineRow)[c] is int]


class TimelineLog:
    """The engine's timeline as it grows: rows are packed into float64 blocks of BLOCK steps
    (8 bytes a field instead of a Python object each: a day of traffic is millions of steps),
    each block then a table block (sim/resultlog.py: spilled to disk beyond what is held).
    Every field is an integer or a float64 already, so packing loses nothing."""
    BLOCK = 8192

    def __init__(self, hold_rows: int | None = None):
        import pandas as pd
        from sim.resultlog import TableLog
        empty = pd.DataFrame({c: np.zeros(0, np.int64 if i in _INT_COLUMNS else np.float64)
                              for i, c in enumerate(TIMELINE_COLUMNS)})
        self._table = TableLog(list(TIMELINE_COLUMNS), hold_rows, empty=empty)
        self._rows: list[tuple] = []

    def append(self, row: tuple) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.BLOCK:
            self._pack()

    def extend(self, rows) -> None:
        self._rows.extend(rows)
        if len(self._rows) >= self.BLOCK:
            self._pack()

    def _pack(self) -> None:
        import pandas as pd
        data = np.array(self._rows, dtype=np.float64).reshape(-1, len(TIMELINE_COLUMNS))
        self._rows = []
        self._table.append(pd.DataFrame({c: data[:, i].astype(np.int64) if i in _INT_COLUMNS else data[:, i]
                                         for i, c in enumerate(TIMELINE_COLUMNS)}))

    def __len__(self) -> int:
        return len(self._table) + len(self._rows)

    def table(self):
        """The timeline so far as a TableLog."""
        if self._rows:
            self._pack()
        return self._table

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> values (integer columns as int64), in step order."""
        df = self.table().frame()
        return {c: df[c].to_numpy() for c in TIMELINE_COLUMNS}
