"""Rerouting: a route whose expert is not resident goes to its next-ranked resident expert.

Ranking: the step's full router probabilities when the trace has them, else the
policy's ranking (sim/policies/base.py reroute_rank_from), given the experts'
popularity (routed counts seen so far, which this class keeps).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sim.policies.cache import ExpertCache


class Rerouter:
    def __init__(self, cache: ExpertCache, rank_from: Callable[[np.ndarray], np.ndarray]):
        L, E = cache.resident.shape
        self.cache = cache
        self.rank_from = rank_from          # popularity ((L, E) or (T, L, E)) -> preference, same shape
        self.popularity = np.ones((L, E))   # routed counts seen so far (the fallback order)
        self._layer_idx = np.arange(L)[None, :, None]

    def rank(self) -> np.ndarray:
        """(L, E) preference among resident experts when the trace has no router probabilities."""
        return self.rank_from(self.popularity)

    def reroute(self, batch, rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Send each route whose expert is not resident to its next-ranked resident expert
        (`rank`: (n, L, E) per token, else rank()). Returns (experts after reroute, hit
        slots (n, L, k), rerouted routes (n, L))."""
        ex = batch.experts
        resident = self.cache.resident
        hit = resident[self._layer_idx, ex]
        miss = ~hit
        rerouted = miss.any(axis=2)
        if not rerouted.any():
            return ex, hit, rerouted
        ti, li = np.nonzero(rerouted)
        sub_ex, sub_miss = ex[ti, li].astype(np.int64), miss[ti, li]            # (m, k)
        if batch.probs is not None:
            score = batch.probs[ti, li].astype(np.float32)
        else:
            score = (self.rank()[li] if rank is None else rank[ti, li]).astype(np.float32)
        score = np.where(resident[li], score, -np.inf)
        kept_ex = np.where(sub_miss, -1, sub_ex)
        rows = np.arange(len(ti))[:, None]
        score[np.broadcast_to(rows, kept_ex.shape)[kept_ex >= 0], kept_ex[kept_ex >= 0]] = -np.inf
        cand = np.argsort(-score, axis=1, kind="stable")                         # best resident first
        order = np.cumsum(sub_miss, axis=1) - 1
        fill = np.take_along_axis(cand, np.maximum(order, 0), axis=1)
        new = ex.copy()
        new[ti, li] = np.where(sub_miss, fill, sub_ex)
        return new, hit, rerouted
