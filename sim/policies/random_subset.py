"""`random`: a fixed random subset of the experts per layer (the paper's Random baseline).
A route to any other expert goes to its next-ranked resident one."""
from dataclasses import dataclass

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan
from sim.policies.params import CacheParams


@dataclass(frozen=True)
class RandomParams(CacheParams):
    capacity: float = 0.6
    miss: str = "reroute"


class RandomPolicy(ExpertPolicy):
    name = "random"
    Params = RandomParams

    fixed_set = True   # miss=fetch: a fetched expert streams through and is dropped

    def initial_load(self):
        for layer in range(self.L):
            self.resident[layer, self.rng.choice(self.E, self.capacity[layer], replace=False)] = True

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)

    # Light load under rerouting: the subset is fixed, so a decode run's reroutes are computed at once.
    decode_runs = True

    def decode_run_ready(self) -> bool:
        return self.miss_mode == "reroute"

    @property
    def max_decode_loads(self) -> int:
        return 0

    def plan_decode_run(self, run: StepBatch):
        return self._plan_reroute_run(run)
