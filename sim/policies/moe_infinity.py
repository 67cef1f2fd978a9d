"""`moe_infinity`: MoE-Infinity (Xue et al. 2024) activation-aware prefetching and caching.

Each running request keeps an expert activation matrix (EAM: layer x expert routed
counts of its tokens so far). Every `rematch_every` tokens it is matched (cosine
similarity) against the EAMs of finished requests (the last `library_size`), and the
matched EAM predicts the request's expert shares per layer.

- Prefetch, as each iteration starts: the experts the step's requests are predicted
  to use (per request and layer, its matched EAM's top experts: top_k per token it
  brings, at most all), for every layer of the iteration, nearest layer first and,
  within a layer, the most predicted activation first; they overlap with compute
  (the copy rule decides who waits). At most `prefetch_per_step` copies per step
  (0: no limit: the link's bandwidth is the limit, as in the paper).
- Cache priority: an expert's predicted activation summed over the running requests
  (least recent use breaks ties); a prefetch replaces a resident expert only if the
  resident one is predicted to be less active.
- The prediction for a step uses only the routing of earlier steps; the step's own
  routing is added to the EAMs after it is served.
- A miss (a needed expert neither resident nor prefetched) is fetched on demand or,
  with `miss: reroute`, sent to the next-ranked available expert."""
from dataclasses import dataclass

import numpy as np

from sim.params import ParamError
from sim.policies.base import STEP_START, ExpertPolicy, RunPlan, StepBatch, StepPlan
from sim.policies.params import CacheParams


@dataclass(frozen=True)
class MoEInfinityParams(CacheParams):
    capacity: float = 0.6
    library_size: int = 512      # finished requests' EAMs kept for matching
    rematch_every: int = 16      # tokens between a request's matches
    prefetch_per_step: int = 0   # copies per step at most (0: no limit)

    def check(self) -> None:
        super().check()
        for k in ("library_size", "rematch_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ParamError(f"{k} must be a positive integer, got {v!r}")
        if not isinstance(self.prefetch_per_step, int) or self.prefetch_per_step < 0:
            raise ParamError(f"prefetch_per_step must be a non-negative integer (0: no limit), "
                             f"got {self.prefetch_per_step!r}")


class MoEInfinityPolicy(ExpertPolicy):
    name = "moe_infinity"
    Params = MoEInfinityParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.library = np.zeros((0, self.L * self.E))
        self.score = np.zeros((self.L, self.E))       # summed predicted activation of running requests
        self.last_used = np.zeros((self.L, self.E))
        self.clock = 0
        # per running request (by index): its EAM, tokens seen, and current prediction
        self.eam: dict[int, np.ndarray] = {}
        self.seen: dict[int, int] = {}
        self.pred: dict[int, np.ndarray] = {}

    # ---- the activation matrices -------------------------------------------------------
    def _predict(self, eam: np.ndarray) -> np.ndarray:
        """(L, E) predicted expert shares: the most similar finished request's EAM (or, with
        none yet, the request's own so far)."""
        flat = eam.ravel()
        norm = np.linalg.norm(flat)
        if len(self.library) == 0 or norm == 0:
            return flat.reshape(self.L, self.E) / max(flat.sum(), 1)
        sims = self.library @ flat / (np.linalg.norm(self.library, axis=1) * norm + 1e-12)
        return self.library[int(np.argmax(sims))].reshape(self.L, self.E)

    def _update_prediction(self, req):
        old = self.pred.get(req.index)
        new = self._predict(self.eam[req.index])
        if old is not None:
            self.score -= old
        self.score += new
        self.pred[req.index] = new

    def on_admit(self, req, now):
        if req.index not in self.eam:   # (a preempted request keeps what it had)
            self.eam[req.index] = np.zeros((self.L, self.E))
            self.seen[req.index] = 0

    def on_finish(self, req, now):
        eam = self.eam.pop(req.index, None)
        self.seen.pop(req.index, None)
        pred = self.pred.pop(req.index, None)
        if pred is not None:
            self.score -= pred
        if eam is not None and eam.sum() > 0:
            row = (eam / eam.sum()).ravel()[None, :]
            self.library = np.concatenate([self.library, row])[-int(self.params.library_size):]

    def evict_key(self, batch):
        # Lowest predicted activation first; ties broken by least recent use.
        return self.score + 1e-9 * self.last_used / (self.clock + 1)

    def touch(self, used, needed):
        self.clock += 1
        self.last_used[used] = self.clock

    @property
    def max_decode_loads(self) -> int:
        """A single-token step's copies: its prefetches (top_k predicted per layer, at most
        prefetch_per_step) plus its misses under fetch."""
        prefetch = self.L * self.k
        if self.params.prefetch_per_step:
            prefetch = min(prefetch, int(self.params.prefetch_per_step))
        return prefetch + (0 if self.miss_mode == "reroute" else self.L * self.k)

    # ---- a step ---------------------------------------------------------------------------
    def plan_step(self, batch: StepBatch) -> StepPlan:
        predicted, share = self._predicted(batch)
        wanted = []
        if predicted is not None:
            layers, experts = np.nonzero(predicted & ~self.resident)
            order = np.lexsort((-share[layers, experts], layers))      # nearest layer first
            budget = int(self.params.prefetch_per_step) or len(order)
            wanted = [(STEP_START, int(layers[i]), int(experts[i])) for i in order[:budget]]
        copies, fresh = self.admit_prefetch(batch, wanted, protect=predicted, only_if_better=True)
        plan = self.serve(batch, copies, fresh)
        self._observe(batch)
        return plan

    def _predicted(self, batch: StepBatch):
        """(L, E) experts the step's requests are predicted to use, and their summed shares."""
        preds = [self.pred.get(r.index) for r in batch.requests]
        have = [i for i, p in enumerate(preds) if p is not None]
        if not have:
            return None, None
        P = np.stack([preds[i] for i in have])                                  # (m, L, E)
        tokens = np.bincount(batch.token_req, minlength=len(batch.requests))[have]
        return self._top_predicted(P, tokens), P.sum(axis=0)

    def _top_predicted(self, P: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """(L, E) the experts in each request's predicted top (top_k per token it brings)."""
        top = np.minimum(tokens * self.k, self.E)                               # experts each may use
        rank = (-P).argsort(axis=2, kind="stable").argsort(axis=2, kind="stable")
        return ((rank < top[:, None, None]) & (P > 0)).any(axis=0)

    def _observe(self, batch: StepBatch) -> None:
        """Add the step's routing to its requests' EAMs; rematch every `rematch_every` tokens."""
        L, E = self.L, self.E
        n_req = len(batch.requests)
        idx = ((batch.token_req[:, None, None] * L + np.arange(L)[None, :, None]) * E + batch.experts).ravel()
        per_req = np.bincount(idx, minlength=n_req * L * E).reshape(n_req, L, E)
        tokens = np.bincount(batch.token_req, minlength=n_req)
        every = self.params.rematch_every
        for i, r in enumerate(batch.requests):
            self.on_admit(r, 0.0)
            self.eam[r.index] += per_req[i]
            seen = self.seen[r.index]
            self.seen[r.index] = seen + int(tokens[i])
            if r.index not in self.pred or self.seen[r.index] // every != seen // every:
                self._update_prediction(r)

    # ---- light load: a lone request's decode steps that prefetch nothing (sim/engine.py decode runs) ----
    decode_runs = True

    def decode_run_ready(self) -> bool:
        return self.miss_mode == "fetch"

    def plan_decode_run(self, run: StepBatch) -> RunPlan | None:
        """One request's single-token steps, without stepping, up to the first that would
        prefetch. A lone request's prediction changes only when it is rematched (every
        `rematch_every` tokens), so its predicted experts are copied in the step after a
        rematch and mostly stay resident (they rank high for eviction; one tied in score with
        another expert may be evicted by a miss and copied back) until the next: the steps
        between prefetch nothing, and their misses are fetched on demand. The run plans those
        steps (None if fewer than two: the engine steps) and stops before a step that would
        copy a predicted expert (judged exactly: _would_prefetch; that step is stepped).
        Eviction is by (score + a least-recent-use tie-break, expert id), lowest first: per
        step a ranking of the layer (used first, then the rest by that key), computed only
        for steps that miss; rematches recompute the prediction where stepping would."""
        ex, req = run.experts, run.requests[0]
        T, L, E = len(ex), self.L, self.E
        if self._prefetches_now(req):                   # (often, with a small cache: cheap to tell)
            return None
        counts = self._run_counts(ex)
        used = counts > 0
        i = req.index
        eam = self.eam[i].copy() if i in self.eam else np.zeros((L, E))
        seen, pred = self.seen.get(i, 0), self.pred.get(i)
        score = self.score.copy()
        one = np.ones(1, dtype=np.int64)
        predicted = None if pred is None else self._top_predicted(pred[None], one)
        # evict_key's recency term at each step: each expert's last use before step t (as touch()
        # sets it: the run's steps, else the state's), the same arithmetic as evict_key's
        clock0, every = self.clock, int(self.params.rematch_every)
        step_of = np.where(used, np.arange(T)[:, None, None], -1)
        last = np.concatenate([np.full((1, L, E), -1), np.maximum.accumulate(step_of, axis=0)[:-1]])
        last_used = np.where(last >= 0, clock0 + 1 + last, self.last_used)
        recency = 1e-9 * last_used / (clock0 + np.arange(T) + 1)[:, None, None]
        rows, kth = np.arange(L), E - self.capacity
        states = np.empty((T + 1, L, E), dtype=bool)
        states[0] = res = self.resident.copy()
        for t in range(T):
            if predicted is not None and np.count_nonzero(predicted > res) and \
                    self._would_prefetch(predicted, res, score + recency[t], pred):
                T = t                                   # this step prefetches: stepped
                break
            u = used[t]
            if np.count_nonzero(u > res):               # misses: admitted, evicting the lowest keys
                order = (score + recency[t]).argsort(axis=1, kind="stable").argsort(axis=1)   # (key, id) ranks
                c = np.where(u, E, np.where(res, order, -1))
                ranked = np.sort(c, axis=1)
                res = c >= np.maximum(ranked[rows, kth], 0)[:, None]
            states[t + 1] = res
            eam += counts[t]                            # _observe: this step's routing, then a rematch
            seen += 1
            if pred is None or seen % every == 0:
                new = self._predict(eam)
                if pred is not None:
                    score -= pred
                score += new
                pred = new
                predicted = self._top_predicted(pred[None], one)
        if T < 2:
            return None
        ex, counts, used, states = ex[:T], counts[:T], used[:T], states[:T + 1]
        miss = used & ~states[:-1]
        self._account_run(ex, counts, miss, req)
        self.resident[...] = states[-1]
        self.eam[i], self.seen[i], self.pred[i], self.score = eam, seen, pred, score
        lu = np.maximum.accumulate(step_of[:T], axis=0)[-1]
        self.last_used = np.where(lu >= 0, clock0 + 1 + lu, self.last_used)
        self.clock = clock0 + T
        return RunPlan(counts=counts, demand=np.add.reduce(miss, axis=2), resident=states[1:].sum(axis=(1, 2)))

    def _prefetches_now(self, req) -> bool:
        """Whether the request's next single-token step would prefetch (plan_decode_run's first
        check, on the state as it is)."""
        pred = self.pred.get(req.index)
        if pred is None:
            return False
        predicted = self._top_predicted(pred[None], np.ones(1, dtype=np.int64))
        return bool(np.count_nonzero(predicted > self.resident)) and \
            self._would_prefetch(predicted, self.resident, self.evict_key(None), pred)

    def _would_prefetch(self, predicted, res, key, share) -> bool:
        """Whether plan_step, in this state, copies any of the predicted experts not resident:
        the first of them (in its order, within prefetch_per_step) that finds a free slot, or
        a resident expert outside the prediction with a lower key (only_if_better), is copied.
        No copy changes nothing, so each can be judged against the state as it is."""
        layers, experts = np.nonzero(predicted & ~res)
        order = np.lexsort((-share[layers, experts], layers))[:int(self.params.prefetch_per_step) or None]
        layers, experts = layers[order], experts[order]
        if (np.add.reduce(res, axis=1)[layers] < self.capacity[layers]).any():
            return True
        best = np.where(res & ~predicted, key, np.inf).min(axis=1)     # the victim's key, per layer
        return bool((best[layers] < key[layers, experts]).any())
