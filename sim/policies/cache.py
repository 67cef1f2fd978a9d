"""The expert cache a policy keeps on the device: which experts each layer holds.

Residency only. Which expert goes first is the policy's choice: it supplies an
eviction key ((L, E), smaller evicted first; None: lowest expert id first) through
a zero-argument callable, called only when something must be evicted (some keys,
the oracle's look-ahead, cost a pass over the trace). When copies happen is the
engine's business.

Hot path: admit runs once per engine step, so it works on whole (L, E) arrays
(ndarray methods and np.add.reduce, which skip numpy's Python-level wrappers).
"""
from __future__ import annotations

from collections.abc import Callable
from math import inf

import numpy as np

NO_COPIES = ()

EvictKey = Callable[[], "np.ndarray | None"]


def row_sums(x: np.ndarray) -> np.ndarray:
    """(L, E) -> (L,), bools counted as ints; np.add.reduce skips ndarray.sum's Python wrapper."""
    return np.add.reduce(x, axis=1)


class ExpertCache:
    """`capacity[l]` expert slots per layer; `resident` (L, E) says which experts fill them.

    fixed: the set never changes on a miss (a fetched expert streams through the
    staging buffer and is dropped after use)."""

    def __init__(self, capacity: np.ndarray, n_experts: int, fixed: bool = False):
        L, E = len(capacity), n_experts
        self.capacity = capacity
        self.fixed = fixed
        self.resident = np.zeros((L, E), dtype=bool)
        self._zeros_L = np.zeros(L, dtype=np.int64)
        self._expert_ids = np.broadcast_to(np.arange(E), (L, E))   # default eviction order: lowest id
        self._row_of = np.broadcast_to(np.arange(L)[:, None], (L, E))

    @property
    def slots(self) -> int:
        """Expert slots the cache may fill: what the memory budget reserves."""
        return int(self.capacity.sum())

    def fill_lowest(self) -> None:
        """Each layer holds its first `capacity` experts."""
        for layer in range(len(self.capacity)):
            self.resident[layer, : self.capacity[layer]] = True

    def admit(self, missing: np.ndarray, used: np.ndarray, key: EvictKey) -> np.ndarray:
        """Make `missing` resident in every layer at once, evicting experts this step does
        not use, most evictable first. What still does not fit streams through the
        staging buffer and is dropped after use; returns how many did, per layer."""
        if self.fixed:
            return missing.sum(axis=1)
        res = self.resident
        n_want = row_sums(missing)
        free = self.capacity - row_sums(res)
        short = n_want - free
        if short.max() > 0:
            evictable = res & ~used
            if evictable.any():                            # (none when the step uses every resident expert)
                k = key()
                order = np.where(evictable, self._expert_ids if k is None else k, np.inf).argsort(
                    axis=1, kind="stable")
                n_out = np.minimum(np.maximum(short, 0), row_sums(evictable))
                first = self._expert_ids < n_out[:, None]  # the first n_out of each layer's order
                res[self._row_of[first], order[first]] = False
                free = free + n_out
        if (n_want <= free).all():                         # everything fits (the usual case)
            res |= missing
            return self._zeros_L
        take = missing & (missing.cumsum(axis=1) <= free[:, None])
        res |= take
        return n_want - row_sums(take)

    def admit_prefetch(self, wanted, key: EvictKey, protect: np.ndarray | None = None,
                       only_if_better: bool = False):
        """Make each wanted (issue point, layer, expert) resident, in order, for prefetching.

        A full layer evicts its most evictable expert outside `protect` ((L, E): what the
        policy expects the step to use) and this step's own prefetches; with
        only_if_better, only an expert whose key is below the wanted one's. Wanted experts
        already resident, and those with nothing to evict, are skipped. Returns (the copies
        issued, in order; the (L, E) experts they bring, or None if none)."""
        if not wanted:
            return NO_COPIES, None
        res = self.resident
        # One item at a time (each admission changes what the next may evict), so the
        # layers' rows are plain lists: a few list operations an item instead of a handful
        # of numpy calls on E-element rows (same decisions: the lowest id wins a tie).
        held = res.tolist()
        n_held = np.add.reduce(res, axis=1).tolist()
        capacity = self.capacity.tolist()
        blocked = None if protect is None else protect.tolist()
        copies = []
        fresh: set = set()
        keys = None
        for at, layer, e in wanted:
            row = held[layer]
            if row[e]:
                continue
            if n_held[layer] >= capacity[layer]:
                skip = blocked[layer] if blocked is not None else None
                cand = [r and (layer, j) not in fresh and not (skip is not None and skip[j]) for j, r in enumerate(row)]
                if not any(cand):
                    continue
                if keys is None:
                    k = key()
                    keys = (self._expert_ids if k is None else k).tolist()
                kl = keys[layer]
                vals = [kl[j] if c else inf for j, c in enumerate(cand)]
                best = min(vals)
                victim = vals.index(best)      # np.argmin's choice: the first of the smallest
                if only_if_better and best >= kl[e]:
                    continue
                if row[victim]:
                    row[victim] = False
                    n_held[layer] -= 1
            row[e] = True
            n_held[layer] += 1
            fresh.add((layer, e))
            copies.append((at, layer, e))
        if not copies:
            return NO_COPIES, None
        res[...] = held
        brought = np.zeros_like(res)
        layers, experts = zip(*fresh)
        brought[list(layers), list(experts)] = True
        return copies, brought
