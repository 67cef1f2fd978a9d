"""What a policy counts, globally and per request (the definitions are in sim/policies/base.py).

Expert level: hits, misses, loads on demand or by a prefetch the step used, and
prefetches ahead. Route level (one per token and layer): reroutes, gate mass kept,
and the same in the layers the request's task is sensitive to (`sensitivity`: the
table fidelity is judged by).

Float sums are added in the same order whether a decode run is counted at once or
step by step, so both give the same totals.
"""
from __future__ import annotations

import numpy as np


class Accounting:
    def __init__(self, n_layers: int, top_k: int, sensitivity):
        self.L, self.k = n_layers, top_k
        self.sensitivity = sensitivity
        self._sens_rows: dict[str, tuple[np.ndarray, float]] = {}   # task -> (row, its sum)
        self.hits = self.misses = self.reroutes = 0
        self.loads = self.ahead_loads = 0
        self.gate_kept = 0.0
        self.routes = 0
        self.sensitive_kept = 0.0
        self.sensitive_routes = 0.0

    def judge_by(self, sensitivity) -> None:
        """Judge routing_fidelity_sensitive by this table (before any step is counted)."""
        assert self.routes == 0, "the judging table changed after steps were counted"
        self.sensitivity = sensitivity
        self._sens_rows.clear()

    # ---- expert level ---------------------------------------------------------------
    def served(self, n_used: int, n_miss: int, n_fresh: int) -> None:
        """A step used n_used experts: n_miss copied on demand, n_fresh brought by its prefetches."""
        self.hits += n_used - n_miss - n_fresh
        self.misses += n_miss
        self.loads += n_miss

    def prefetched(self, n_copies: int, n_used: int) -> None:
        """A step's prefetch copies: those its layers use are misses, the rest prefetches ahead."""
        self.misses += n_used
        self.loads += n_used
        self.ahead_loads += n_copies - n_used

    # ---- route level ------------------------------------------------------------------
    def _sens(self, task: str) -> tuple[np.ndarray, float]:
        got = self._sens_rows.get(task)
        if got is None:
            row = self.sensitivity.row(task)
            got = self._sens_rows[task] = (row, float(row.sum()))
        return got

    def _sens_known(self, requests) -> dict:
        """The per-task sensitivity rows, every one of these requests' tasks among them."""
        rows = self._sens_rows
        for r in requests:
            if r.task not in rows:
                self._sens(r.task)
        return rows

    def sensitive_sum(self, requests) -> float:
        """Sum over requests, in order, of their task's sensitivity row's sum (one token each)."""
        rows = self._sens_known(requests)
        return float(sum(rows[r.task][1] for r in requests))

    def step(self, batch, hit_slots: np.ndarray | None, rerouted: np.ndarray | None,
             hits: np.ndarray | None = None) -> None:
        """Per-request and global route counters for this step (hit_slots (n, L, k): the
        routes' experts that were held; rerouted (n, L): routes sent elsewhere; or, with
        nothing rerouted, hits (requests,): each request's routes to held experts)."""
        n_req = len(batch.requests)
        tok_per_req = None if n_req == 1 else np.bincount(batch.token_req, minlength=n_req)
        if rerouted is None or hit_slots is None:
            if n_req == 1:
                s = len(batch.token_req) * self._sens(batch.requests[0].task)[1]
            else:
                rows = self._sens_known(batch.requests)
                s = float(sum(n * rows[r.task][1] for n, r in zip(tok_per_req.tolist(), batch.requests)))
            self.sensitive_kept += s
            self.sensitive_routes += s
        else:
            g = batch.gates.astype(np.float32)
            kept_tl = (g * hit_slots).sum(axis=2) / np.maximum(g.sum(axis=2), 1e-9)       # (n, L)
            S = np.stack([self._sens(r.task)[0] for r in batch.requests])[batch.token_req]   # (n, L)
            self.sensitive_kept += float((kept_tl * S).sum())
            self.sensitive_routes += float(S.sum())
        if n_req == 1 and rerouted is None:   # light load: one request, nothing rerouted
            n_routes = len(batch.token_req) * self.L
            slots = n_routes * self.k
            if hits is not None:
                held = int(hits[0])
            else:
                held = slots if hit_slots is None else int(np.count_nonzero(hit_slots))
            self._credit_unrerouted(batch.requests, [held], [slots], [n_routes])
            return
        per_routes = (np.bincount(batch.token_req, minlength=n_req) if tok_per_req is None else tok_per_req) * self.L
        slots = per_routes * self.k
        if hits is not None:
            per_hit = hits
        elif hit_slots is None:   # nothing missed this step
            per_hit = slots
        else:
            per_hit = np.bincount(batch.token_req, np.count_nonzero(hit_slots, axis=(1, 2)),
                                  minlength=n_req).astype(np.int64)
        if rerouted is None:
            # Every route keeps its whole gate mass: a request keeps L per token, exactly.
            self._credit_unrerouted(batch.requests, per_hit.tolist(), slots.tolist(), per_routes.tolist())
            return
        if hit_slots is None:
            kept = np.full(len(batch.token_req), float(self.L))
        else:
            g = batch.gates.astype(np.float32)
            kept = ((g * hit_slots).sum(axis=2) / np.maximum(g.sum(axis=2), 1e-9)).sum(axis=1)
        per_kept = np.bincount(batch.token_req, kept, minlength=n_req)
        per_rr = np.bincount(batch.token_req, rerouted.sum(axis=1), minlength=n_req)
        for i, r in enumerate(batch.requests):
            r.hits += int(per_hit[i])
            r.misses += int(slots[i] - per_hit[i])
            r.gate_kept += float(per_kept[i])
            r.routes += int(per_routes[i])
            r.reroutes += int(per_rr[i])
        self.gate_kept += float(kept.sum(dtype=np.float64))   # float32 terms, summed in double
        self.routes += int(per_routes.sum())
        self.reroutes += int(rerouted.sum())

    def run(self, experts: np.ndarray, counts: np.ndarray, miss: np.ndarray, req) -> None:
        """The counters of T single-token fetch steps of `req` (what served + step add up step by
        step): experts (T, L, k) routed, counts (T, L, E) per expert, miss (T, L, E) copied."""
        T = len(experts)
        n_miss = int(np.count_nonzero(miss))
        self.hits += int(np.count_nonzero(counts)) - n_miss
        self.misses += n_miss
        self.loads += n_miss
        slots = T * self.L * self.k
        hits = slots - int(np.count_nonzero(np.take_along_axis(miss, experts.astype(np.int64), axis=2)))
        s = self._sens(req.task)[1]
        for _ in range(T):          # float sums in the same order as step by step
            self.sensitive_kept += s
            self.sensitive_routes += s
        self._credit_unrerouted([req], [hits], [slots], [T * self.L])

    def _credit_unrerouted(self, requests, hits: list, slots: list, routes: list) -> None:
        """Requests' routes, none rerouted (per request: hits, route slots, routes): every
        route keeps its whole gate mass."""
        for r, h, s, n in zip(requests, hits, slots, routes):
            r.hits += h
            r.misses += s - h
            r.gate_kept += n
            r.routes += n
        total = sum(routes)
        self.gate_kept += total
        self.routes += total

    def counters(self, bytes_per_expert: float) -> dict:
        accesses = self.hits + self.misses
        return dict(hits=self.hits, misses=self.misses, reroutes=self.reroutes,
                    expert_loads=self.loads + self.ahead_loads, prefetches_ahead=self.ahead_loads,
                    bytes_loaded=(self.loads + self.ahead_loads) * bytes_per_expert,
                    expert_hit_rate=self.hits / accesses if accesses else 1.0,
                    routing_fidelity=self.gate_kept / self.routes if self.routes else 1.0,
                    routing_fidelity_sensitive=self.sensitive_kept / self.sensitive_routes
                    if self.sensitive_routes else 1.0)
