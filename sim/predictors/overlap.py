"""Which requests of a trace a predictor (or a warm start) has already seen.

A request is identified by its routing, not by its id alone: every synthetic trace names
its requests r000000, r000001, ... whatever its seed, so two different traces share ids,
while a re-imported trace may rename the same requests. A predictor file keeps, beside
its training requests' trace ids (`train_ids`), a digest of each one's lengths and routed
experts (`train_digests`); a request of another trace overlaps when its digest is among
them. Files written before digests were kept fall back to comparing ids.
"""
from __future__ import annotations

import hashlib

import numpy as np


DROP_ROWS = 1 << 20   # a mapped trace's pages read so far are dropped every this many rows


def request_digests(trace, idx=None) -> list[str]:
    """One short hex digest per request: prompt and output lengths plus routed experts. A trace
    mapped from its file is read in one pass whose pages are dropped as it goes (a day of
    traffic's routing need not sit in memory for this check)."""
    from traces.npz import MappedRows
    idx = range(trace.n_requests) if idx is None else [int(i) for i in idx]
    drop = trace.source.drop_rows if isinstance(trace.source, MappedRows) else None
    out, lo, hi = [], None, 0
    for r in idx:
        h = hashlib.blake2b(digest_size=8)
        h.update(np.array([trace.prompt_tokens[r], trace.output_tokens[r]], dtype=np.int64).tobytes())
        rows = trace.token_slice(r)
        h.update(np.ascontiguousarray(trace.experts[rows]).tobytes())
        out.append(h.hexdigest())
        if drop is not None:   # (before the run: no other reader of these pages yet)
            lo, hi = rows.start if lo is None else min(lo, rows.start), max(hi, rows.stop)
            if hi - lo >= DROP_ROWS:
                drop(lo, hi)
                lo, hi = None, 0
    if drop is not None and lo is not None:
        drop(lo, hi)
    return out


def seen_requests(trace, train_ids, train_digests=None) -> np.ndarray:
    """Indices of the trace's requests among the training requests."""
    if train_digests:
        return np.flatnonzero(np.isin(request_digests(trace), list(train_digests)))
    return np.flatnonzero(np.isin(trace.request_id, list(train_ids)))


def check_disjoint(source: str, trace, train_ids, train_digests=None, allow: bool = False,
                   saw: str = "was trained on") -> int:
    """Refuse (ValueError) when `source`'s training requests are among the trace's; returns the overlap."""
    seen = seen_requests(trace, train_ids, train_digests)
    if len(seen) and not allow:
        ids = ", ".join(trace.request_id[seen[:3]].tolist())
        raise ValueError(f"{source} {saw} {len(seen)} of the {trace.n_requests} simulated requests "
                         f"(e.g. {ids}), so its predictions would be optimistic; simulate requests it never saw "
                         "(another trace or seed, or train on a disjoint part) or set policy.allow_overlap: true")
    return len(seen)
