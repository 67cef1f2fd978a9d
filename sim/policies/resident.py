"""`resident`: every expert on the GPU (vLLM / DeepSpeed-FastGen style). The memory ceiling."""
import numpy as np

from sim.policies.base import ExpertPolicy, RunPlan, StepBatch, StepPlan


class ResidentPolicy(ExpertPolicy):
    name = "resident"
    PARAMS: dict = {}

    def _capacity_per_layer(self):
        return np.full(self.L, self.E, dtype=np.int64)

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)

    @property
    def plans_decode_runs(self) -> bool:
        return True

    @property
    def max_decode_loads(self) -> int:
        return 0

    def plan_decode_run(self, experts: np.ndarray, req) -> RunPlan:
        counts = self._run_counts(experts)
        self._account_run(experts, counts, np.zeros(counts.shape, dtype=bool), req)
        T = len(experts)
        return RunPlan(counts, np.zeros((T, self.L), dtype=np.int64), np.full(T, int(self.resident.sum())))
