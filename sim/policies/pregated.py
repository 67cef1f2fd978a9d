"""`pregated`: Pre-gated MoE style. While layer l-1 computes, predict layer l's experts
and prefetch them (one layer ahead); a prediction misses each needed expert with
probability 1 - recall, and those are fetched on demand when the router asks.
The cache is small (default: a quarter of the experts, LRU)."""
import numpy as np

from sim.policies.base import StepBatch, StepPlan, as_layer_starts
from sim.policies.on_demand import OnDemandPolicy


class PregatedPolicy(OnDemandPolicy):
    name = "pregated"
    PARAMS = {"capacity": 0.25, "capacity_bytes": None, "eviction": "lru", "miss": "fetch", "recall": 0.9}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        r = params.get("recall", 0.9)
        if not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"recall must be in [0, 1], got {r!r}")

    def plan_step(self, batch: StepBatch) -> StepPlan:
        predicted = self.rng.random((self.L, self.E)) < self.params["recall"]
        used = self._needed(batch.experts) > 0
        layers, experts = np.nonzero(used & ~self.resident & predicted)
        wanted = [(as_layer_starts(max(int(l) - 1, 0)), int(l), int(e)) for l, e in zip(layers, experts)]
        copies, fresh = self.admit_prefetch(wanted, protect=used)
        return self.serve(batch, copies, fresh)
