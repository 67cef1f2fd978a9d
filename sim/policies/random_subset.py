"""`random`: a fixed random subset of the experts per layer (the paper's Random baseline).
A route to any other expert goes to its next-ranked resident one."""

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan


class RandomPolicy(ExpertPolicy):
    name = "random"
    PARAMS = {"capacity": 0.6, "capacity_bytes": None, "miss": "reroute"}

    def initial_load(self):
        for layer in range(self.L):
            self.resident[layer, self.rng.choice(self.E, self.capacity[layer], replace=False)] = True

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)

    def _admit(self, missing, used):
        """miss=fetch: the subset is fixed, so a fetched expert streams through and is dropped."""
        return missing.sum(axis=1)

    # Light load under rerouting: the subset is fixed, so a decode run's reroutes are computed at once.
    decode_runs = True

    def decode_run_ready(self) -> bool:
        return self.miss_mode == "reroute"

    @property
    def max_decode_loads(self) -> int:
        return 0

    def plan_decode_run(self, run: StepBatch):
        return self._plan_reroute_run(run)
