"""`resident`: every expert on the GPU (vLLM / DeepSpeed-FastGen style). The memory ceiling."""
import numpy as np

from sim.params import Params
from sim.policies.base import ExpertPolicy, RunPlan, StepBatch, StepPlan


class ResidentPolicy(ExpertPolicy):
    name = "resident"
    Params = Params     # none: every expert, always

    def _capacity_per_layer(self):
        return np.full(self.L, self.E, dtype=np.int64)

    def plan_step(self, batch: StepBatch) -> StepPlan:
        return self.serve(batch)

    decode_runs = True

    @property
    def max_decode_loads(self) -> int:
        return 0

    def plan_decode_run(self, run: StepBatch) -> RunPlan:
        counts = self._run_counts(run.experts)
        self._account_run(run.experts, counts, np.zeros(counts.shape, dtype=bool), run.requests[0])
        T = len(run.experts)
        return RunPlan(counts=counts, demand=np.zeros((T, self.L), dtype=np.int64),
                       resident=np.full(T, int(self.resident.sum())))

    batch_runs = True

    def plan_batch_run(self, run: StepBatch) -> RunPlan:
        counts, flat = self._batch_counts(run.experts)
        self._account_batch_run(run, counts, flat, np.ones(counts.shape, dtype=bool))
        T = len(counts)
        return RunPlan(counts=counts, demand=np.zeros((T, self.L), dtype=np.int64),
                       resident=np.full(T, int(self.resident.sum())))
