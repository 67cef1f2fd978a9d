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


def request_digests(trace, idx=None) -> list[str]:
    """One short hex digest per request: prompt and output lengths plus routed experts."""
    idx = range(trace.n_requests) if idx is None else [int(i) for i in idx]
    out = []
    for r in idx:
        h = hashlib.blake2b(digest_size=8)
        h.update(np.array([trace.prompt_tokens[r], trace.output_tokens[r]], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(trace.experts[trace.token_slice(r)]).tobytes())
        out.append(h.hexdigest())
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
