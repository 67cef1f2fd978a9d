"""`oracle`: knows the routing ahead. Belady eviction (evict the expert whose next use by
the running requests is farthest away) and perfect one-layer-ahead prefetch: the
bound no cache of the same capacity beats on misses."""
import numpy as np

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan


class OraclePolicy(ExpertPolicy):
    name = "oracle"
    PARAMS = {"capacity": 0.6, "capacity_bytes": None, "miss": "fetch", "horizon": 64}

    def plan_step(self, batch: StepBatch) -> StepPlan:
        self._future = None
        self._batch = batch
        everything = np.ones((self.L, self.E), dtype=bool)
        return self.serve(batch, self._belady, lead=1, early_mask=everything)

    def _future_routes(self):
        """(m, H, L, k) routing of the running requests' next H tokens (-1 past their end)."""
        if self._future is None:
            H = int(self.params["horizon"])
            reqs = self._batch.requests
            t = self.trace
            rows = np.array([r.next_row for r in reqs])[:, None] + 1 + np.arange(H)[None, :]
            ends = np.array([r.row0 + r.prompt_tokens + r.output_tokens for r in reqs])[:, None]
            valid = rows < ends
            fut = t.experts[np.minimum(rows, t.n_tokens - 1)].astype(np.int16)
            fut[~valid] = -1
            self._future = fut
        return self._future

    def _belady(self, layer, cand):
        fut = self._future_routes()[:, :, layer, :]                     # (m, H, k)
        H = fut.shape[1]
        uses = (fut[None, :, :, :] == cand[:, None, None, None]).any(axis=3)   # (c, m, H)
        first = np.where(uses.any(axis=2), uses.argmax(axis=2), H + 1).min(axis=1)  # (c,)
        return cand[np.argsort(-first, kind="stable")]
