"""`resident`: every expert on the GPU (vLLM / DeepSpeed-FastGen style). The memory ceiling."""
from sim.policies.base import ExpertPolicy, StepBatch, StepPlan


class ResidentPolicy(ExpertPolicy):
    name = "resident"
    PARAMS: dict = {}

    def _capacity_per_layer(self):
        import numpy as np
        return np.full(self.L, self.E, dtype=np.int64)

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)
