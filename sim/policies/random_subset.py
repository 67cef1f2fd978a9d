"""`random`: a fixed random subset of the experts per layer (the paper's Random baseline).
A route to any other expert goes to its next-ranked resident one."""
import numpy as np

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan


class RandomPolicy(ExpertPolicy):
    name = "random"
    PARAMS = {"capacity": 0.6, "capacity_bytes": None, "miss": "reroute"}

    def initial_load(self):
        for layer in range(self.L):
            self.resident[layer, self.rng.choice(self.E, self.capacity[layer], replace=False)] = True

    def plan_step(self, batch: StepBatch) -> StepPlan:
        if self.miss_mode == "fetch":   # the subset is fixed: a fetched expert is dropped after use
            return self.serve(batch, evict_order=lambda layer, cand: cand[:0])
        return self.serve(batch)
