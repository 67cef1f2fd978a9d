"""`on_demand`: fetch a missing expert when the router asks for it, into an LRU or LFU
cache of fixed capacity (Mixtral-offloading style)."""
import numpy as np

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan


class OnDemandPolicy(ExpertPolicy):
    name = "on_demand"
    PARAMS = {"capacity": 0.6, "capacity_bytes": None, "eviction": "lru", "miss": "fetch"}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        if params.get("eviction", "lru") not in ("lru", "lfu"):
            raise ValueError(f"eviction must be 'lru' or 'lfu', got {params['eviction']!r}")

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.last_used = np.zeros((self.L, self.E))
        self.freq = np.zeros((self.L, self.E))
        self.clock = 0

    def evict_key(self):
        return self.last_used if self.params["eviction"] == "lru" else self.freq

    def touch(self, used, needed):
        self.clock += 1
        self.last_used[used] = self.clock
        self.freq += needed

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)
