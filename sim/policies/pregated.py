"""`pregated`: Pre-gated MoE (Hwang et al. 2024). Layer l's gate also selects layer l+1's
experts, and they are copied while layer l computes (issued once layer l's router has
run); the first layer's experts have no earlier gate and are loaded on demand.

The pre-gate reads hidden states, which a routing trace does not have. Without them
the policy predicts, per token, layer l+1's top_k experts from its routing at layer l
(its router probabilities when the trace has them, else its experts weighted by their
gates) through a layer-to-layer transition table learnt online from the routing this
server has observed (counts of (expert at l, expert at l+1) per token, uniform at
first; each step is predicted before its own routing is learnt). `recall: r` replaces
that predictor by a pre-gate of known quality: each expert layer l+1 needs is predicted
with probability r, nothing else is.

The cache is small (default: a quarter of the experts, LRU); a prefetch evicts the least
recently used expert of its layer that is not predicted. A needed expert that was not
predicted is fetched on demand or, with `miss: reroute`, sent to the next-ranked
available expert."""
from dataclasses import dataclass

import numpy as np

from sim.params import ParamError
from sim.policies.base import StepBatch, StepPlan, after_router
from sim.policies.on_demand import OnDemandParams, OnDemandPolicy


@dataclass(frozen=True)
class PregatedParams(OnDemandParams):
    capacity: float = 0.25
    recall: float | None = None  # None: learnt prediction; r: each needed expert predicted with probability r

    def check(self) -> None:
        super().check()
        r = self.recall
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1):
            raise ParamError(f"recall must be null (learnt prediction) or a number in [0, 1], got {r!r}")


class PregatedPolicy(OnDemandPolicy):
    name = "pregated"
    Params = PregatedParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # transitions[l, a, b]: tokens routed to a at layer l and to b at layer l+1 (+1 prior)
        self.transitions = np.ones((max(self.L - 1, 0), self.E, self.E))

    def plan_step(self, batch: StepBatch) -> StepPlan:
        predicted, score = self._pregate(batch)
        layers, experts = np.nonzero(predicted & ~self.resident)
        order = np.lexsort((-score[layers, experts], layers))
        wanted = [(after_router(layer - 1), layer, e)
                  for layer, e in zip(layers[order].tolist(), experts[order].tolist())]
        copies, fresh = self.admit_prefetch(batch, wanted, protect=predicted)
        plan = self.serve(batch, copies, fresh)
        self._learn(batch.experts)
        return plan

    @property
    def max_decode_loads(self) -> int:
        """A single-token step's copies: its misses under fetch, plus each layer's pre-gated
        top_k (a known-recall pre-gate predicts only needed experts). Per-step copy counts
        also bound a run's link time, queued prefetches included, as the link serves them in turn."""
        demand = 0 if self.miss_mode == "reroute" else self.L * self.k
        if self.params.recall is not None:
            return self.L * self.k
        return demand + max(self.L - 1, 0) * self.k

    def _pregate(self, batch: StepBatch):
        """(L, E) experts predicted for the step (layer 0: none) and their predicted weight."""
        L, E, k = self.L, self.E, self.k
        predicted = np.zeros((L, E), dtype=bool)
        score = np.zeros((L, E))
        if L < 2:
            return predicted, score
        recall = self.params.recall
        if recall is not None:
            needed = self._needed(batch.experts) > 0
            predicted[1:] = needed[1:] & (self.rng.random((L - 1, E)) < recall)
            return predicted, score + predicted
        ex = batch.experts[:, :-1, :].astype(np.int64)                           # (n, L-1, k)
        n = len(ex)
        if batch.probs is not None:
            x = batch.probs[:, :-1, :].astype(np.float32)                         # (n, L-1, E)
        else:
            x = np.zeros((n, L - 1, E), dtype=np.float32)
            np.put_along_axis(x, ex, batch.gates[:, :-1, :].astype(np.float32), axis=2)
        p_next = (self.transitions / self.transitions.sum(axis=2, keepdims=True)).astype(np.float32)
        s = np.matmul(x.transpose(1, 0, 2), p_next).transpose(1, 0, 2)           # (n, L-1, E)
        top = np.argpartition(-s, k - 1, axis=2)[:, :, :k]                        # each token's top_k
        flat = (np.arange(L - 1)[None, :, None] * E + top).ravel()
        predicted[1:] = np.bincount(flat, minlength=(L - 1) * E).reshape(L - 1, E) > 0
        score[1:] = s.sum(axis=0)
        return predicted, score

    def _learn(self, experts: np.ndarray) -> None:
        """Count each token's (expert at l, expert at l+1) pairs."""
        L, E = self.L, self.E
        if L < 2:
            return
        ex = experts.astype(np.int64)
        a = ex[:, :-1, :, None]                                                  # (n, L-1, k, 1)
        b = ex[:, 1:, None, :]                                                   # (n, L-1, 1, k)
        flat = (np.arange(L - 1)[None, :, None, None] * E * E + a * E + b).ravel()
        self.transitions += np.bincount(flat, minlength=(L - 1) * E * E).reshape(L - 1, E, E)
