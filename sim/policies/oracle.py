"""`oracle`: knows the routing ahead. Belady eviction (evict the expert whose next use by
the running requests is farthest away) and perfect one-layer-ahead prefetch (every
expert layer l needs and lacks is copied from the start of layer l-1): the bound no
cache of the same capacity beats on misses. Where a layer needs more experts than
its cache holds, those used again soonest are cached and the rest stream through the
staging buffer (`miss: fetch`) or are rerouted (`miss: reroute`)."""
from dataclasses import dataclass

import numpy as np

from sim.params import ParamError
from sim.policies.base import ExpertPolicy, RunPlan, StepBatch, StepPlan, as_layer_starts
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

    # ---- runs: Belady over decode steps planned at once (sim/engine.py decode and batch runs) ----
    decode_runs = True
    batch_runs = True

    def decode_run_ready(self) -> bool:
        # Under fetch a step prefetches every expert it lacks while its layers can hold them all
        # (a single token's top_k always fit: capacity >= top_k), so it copies nothing on demand.
        return self.miss_mode == "fetch" and self.trace is not None

    def plan_decode_run(self, run: StepBatch) -> RunPlan | None:
        return self._plan_run(run.experts[:, None], run.requests)

    def plan_batch_run(self, run: StepBatch) -> RunPlan | None:
        return self._plan_run(run.experts, run.requests, run)

    def _plan_run(self, ex: np.ndarray, requests: list, batch: StepBatch | None = None) -> RunPlan | None:
        """Belady over T decode steps of the same B requests (ex (T, B, L, k)), without stepping.
        A step prefetches the experts each layer uses and lacks, and a full layer evicts, for
        each, the resident expert the step does not use whose next use by the requests is
        farthest (lowest id first on a tie). So after the step a layer holds the experts it
        used and, of the other resident ones, those used again soonest (then higher id) while
        slots last: a ranking, like LFU's runs. The next uses follow from the requests' routing
        ahead; only the residency needs a loop over steps, a few whole-array operations each.
        Where a step's layer uses more experts than it holds (several tokens a step), some
        stream through on demand: the run ends before it (None if within two steps, before
        changing anything: the engine steps)."""
        T, L, E = len(ex), self.L, self.E
        if batch is not None and any((np.add.reduce(self._needed(ex[t]) > 0, axis=1) > self.capacity).any()
                                     for t in range(min(2, T))):
            return None                                      # (at saturation, the common case: cheap to tell)
        counts, flat = self._batch_counts(ex)
        used = counts > 0
        over = (np.add.reduce(used, axis=2) > self.capacity).any(axis=1)
        if over.any():
            T = int(over.argmax())
            if T < 2:
                return None
            ex, counts, flat, used = ex[:T], counts[:T], flat[:T], used[:T]
        H = int(self.params.horizon)
        keep = None                                          # (computed at the first step that misses)

        def ranking() -> np.ndarray:
            """(T, L, E) each step's keys: higher kept first, the step's own experts first."""
            dist = None
            for r in requests:                           # the soonest next use by any request
                d = self._steps_to_next_use(r, T)
                dist = d if dist is None else np.minimum(dist, d, out=dist)
            return np.where(used, np.inf, (H + 1 - dist.astype(np.int64)) * E + np.arange(E))
        rows, kth = np.arange(L), E - self.capacity          # kth: the capacity-th highest
        states = np.empty((T + 1, L, E), dtype=bool)
        states[0] = res = self.resident.copy()
        for t in range(T):
            u = used[t]
            if not np.count_nonzero(u > res):               # nothing to copy: nothing changes
                states[t + 1] = res
                continue
            if keep is None:
                keep = ranking()
            c = np.where(res | u, keep[t], -1.0)            # -1: neither resident nor used, never kept
            ranked = c.copy()
            ranked.sort(axis=1)
            states[t + 1] = res = c >= np.maximum(ranked[rows, kth], 0.0)[:, None]
        if batch is None:                                    # the prefetches are the steps' misses
            miss = used & ~states[:-1]
            self._account_run(ex[:, 0], counts, miss, requests[0])
        else:
            miss = self._account_batch_run(batch, counts, flat, states[:-1])
        self.resident[...] = res
        return RunPlan(counts=counts, demand=np.zeros((T, L), dtype=np.int64), resident=states[1:].sum(axis=(1, 2)),
                       prefetch=np.add.reduce(miss, axis=2))

    def _steps_to_next_use(self, req, T: int) -> np.ndarray:
        """(T, L, E) evict_key's look-ahead for one request at each of T decode steps, negated:
        steps from step t until the request next uses each expert (0: the next step), H + 1 if
        not within the horizon or the request."""
        H = int(self.params.horizon)
        row = req.next_row                                   # the row step 0 decodes
        end = min(row + T + H, req.row0 + req.prompt_tokens + req.output_tokens)
        ahead = self._run_counts(self.trace.experts[row + 1: max(end, row + 1)]) > 0     # row + 1 + p
        P = len(ahead)
        never = P + H + 1
        at = np.where(ahead, np.arange(P, dtype=np.int32)[:, None, None], np.int32(never))
        nxt = np.full((T, self.L, self.E), never, dtype=np.int32)
        if P:
            nxt[:min(P, T)] = np.minimum.accumulate(at[::-1], axis=0)[::-1][:T]   # first use at or after p
        nxt -= np.arange(T, dtype=np.int32)[:, None, None]
        nxt[nxt >= H] = H + 1
        return nxt
