"""`mru`: fetch on demand; a full layer evicts its most recently used expert.

The example of a policy in one file (CONTRIBUTING.md). MRU suits a cyclic access
pattern longer than the cache, where LRU evicts exactly what comes back next; on
routing with a stable hot set it loses to LRU, which is what the comparison shows.
Everything else - fetching, counting, the copy rule, memory - is ExpertPolicy's.
Decode runs: not declared, so the engine steps it (same results, slower at light load).
"""
from dataclasses import dataclass

import numpy as np

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan
from sim.policies.params import CacheParams


@dataclass(frozen=True)
class MRUParams(CacheParams):     # capacity, capacity_bytes, miss: checked by CacheParams
    capacity: float = 0.6


class MRUPolicy(ExpertPolicy):
    name = "mru"
    Params = MRUParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_used = np.zeros((self.L, self.E))   # step of each expert's last use
        self.steps = 0

    def evict_key(self, batch: StepBatch) -> np.ndarray:
        return -self.last_used                        # smaller is evicted first: the latest use

    def touch(self, used: np.ndarray, needed: np.ndarray) -> None:
        self.steps += 1
        self.last_used[used] = self.steps

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)
