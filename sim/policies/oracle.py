"""`oracle`: knows the routing ahead. Belady eviction (evict the expert whose next use by
the running requests is farthest away) and perfect one-layer-ahead prefetch (every
expert layer l needs and lacks is copied from the start of layer l-1): the bound no
cache of the same capacity beats on misses. Where a layer needs more experts than
its cache holds, those used again soonest are cached and the rest stream through the
staging buffer (`miss: fetch`) or are rerouted (`miss: reroute`)."""
from dataclasses import dataclass

import numpy as np

from sim.params import ParamError
from sim.policies.base import ExpertPolicy, StepBatch, StepPlan, as_layer_starts
from sim.policies.params import CacheParams


@dataclass(frozen=True)
class OracleParams(CacheParams):
    capacity: float = 0.6
    horizon: int = 64            # steps of the running requests' routing it looks ahead

    def check(self) -> None:
        super().check()
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ParamError(f"horizon must be a positive integer (steps), got {self.horizon!r}")


class OraclePolicy(ExpertPolicy):
    name = "oracle"
    Params = OracleParams
    _key_memo = None      # (batch, its requests' rows, evict_key): the key of the step being planned

    def plan_step(self, batch: StepBatch) -> StepPlan:
        used = self._needed(batch.experts) > 0
        layers, experts = np.nonzero(used & ~self.resident)
        if len(layers):   # where a layer cannot hold them all, those used again soonest stay cached
            order = np.lexsort((-self.evict_key(batch)[layers, experts], layers))
            layers, experts = layers[order], experts[order]
        wanted = [(as_layer_starts(max(int(l) - 1, 0)), int(l), int(e)) for l, e in zip(layers, experts)]
        copies, fresh = self.admit_prefetch(batch, wanted, protect=used)
        return self.serve(batch, copies, fresh)

    def evict_key(self, batch):
        """Minus the number of steps until the batch's requests next use each expert (H + 1:
        not within the horizon). Called twice a step (ordering the wanted copies, then
        evicting), so kept for the step: the same requests at the same rows."""
        H = int(self.params.horizon)
        reqs = batch.requests
        at = [r.next_row for r in reqs]
        memo = self._key_memo
        if memo is not None and memo[0] is batch and memo[1] == at:
            return memo[2]
        t = self.trace
        rows = np.array(at)[:, None] + 1 + np.arange(H)[None, :]                           # (m, H)
        ends = np.array([r.row0 + r.prompt_tokens + r.output_tokens for r in reqs])[:, None]
        fut = t.experts[np.minimum(rows, t.n_tokens - 1)].astype(np.int64)                 # (m, H, L, k)
        LE = self.L * self.E
        cell = (np.arange(H)[None, :, None, None] * LE + np.arange(self.L)[None, None, :, None] * self.E + fut)
        seen = np.bincount(cell[(rows < ends)].ravel(), minlength=H * LE).reshape(H, LE) > 0   # used h steps ahead
        first = np.where(seen.any(axis=0), seen.argmax(axis=0), H + 1)
        key = -first.reshape(self.L, self.E).astype(float)
        self._key_memo = (batch, at, key)
        return key
