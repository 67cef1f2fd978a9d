"""`moe_infinity`: MoE-Infinity style activation-aware caching and prefetch.

Each running request keeps an expert activation matrix (EAM: layer x expert
routed counts). Every `rematch_every` tokens it is matched (cosine similarity)
against the EAMs of finished requests; the matched EAM predicts what the request
will use. The summed predictions rank experts: the lowest-ranked resident expert
is evicted first, and the highest-ranked missing ones are prefetched for the
next steps while the current one computes."""
import numpy as np

from sim.policies.base import STEP_START, ExpertPolicy, StepBatch, StepPlan


class MoEInfinityPolicy(ExpertPolicy):
    name = "moe_infinity"
    PARAMS = {"capacity": 0.6, "capacity_bytes": None, "miss": "fetch", "library_size": 512,
              "rematch_every": 16, "prefetch_per_step": 8}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.library = np.zeros((0, self.L * self.E))
        self.score = np.zeros((self.L, self.E))       # summed predicted activation of running requests
        self.last_used = np.zeros((self.L, self.E))
        self.clock = 0

    def _predict(self, eam: np.ndarray) -> np.ndarray:
        flat = eam.ravel()
        norm = np.linalg.norm(flat)
        if len(self.library) == 0 or norm == 0:
            return flat.reshape(self.L, self.E) / max(flat.sum(), 1)
        sims = self.library @ flat / (np.linalg.norm(self.library, axis=1) * norm + 1e-12)
        return self.library[int(np.argmax(sims))].reshape(self.L, self.E)

    def _update_prediction(self, req):
        old = req.extra.get("mi_pred")
        new = self._predict(req.extra["mi_eam"])
        if old is not None:
            self.score -= old
        self.score += new
        req.extra["mi_pred"] = new

    def on_admit(self, req, now):
        req.extra["mi_eam"] = np.zeros((self.L, self.E))
        req.extra["mi_seen"] = 0

    def on_finish(self, req, now):
        eam = req.extra.pop("mi_eam", None)
        pred = req.extra.pop("mi_pred", None)
        if pred is not None:
            self.score -= pred
        if eam is not None and eam.sum() > 0:
            row = (eam / eam.sum()).ravel()[None, :]
            self.library = np.concatenate([self.library, row])[-int(self.params["library_size"]):]

    def evict_key(self):
        # Lowest predicted activation first; ties broken by least recent use.
        return self.score + 1e-9 * self.last_used / (self.clock + 1)

    def plan_step(self, batch: StepBatch) -> StepPlan:
        L, E = self.L, self.E
        n_req = len(batch.requests)
        idx = ((batch.token_req[:, None, None] * L + np.arange(L)[None, :, None]) * E + batch.experts).ravel()
        per_req = np.bincount(idx, minlength=n_req * L * E).reshape(n_req, L, E)
        for i, r in enumerate(batch.requests):
            if "mi_eam" not in r.extra:
                self.on_admit(r, 0.0)
            r.extra["mi_eam"] += per_req[i]
            seen = r.extra["mi_seen"]
            r.extra["mi_seen"] = seen + int((batch.token_req == i).sum())
            if "mi_pred" not in r.extra or r.extra["mi_seen"] // self.params["rematch_every"] \
                    != seen // self.params["rematch_every"]:
                self._update_prediction(r)
        plan = self.serve(batch)
        plan.prefetch = self._prefetch(plan.counts > 0)
        self.ahead_loads += len(plan.prefetch)
        return plan

    def touch(self, used, needed):
        self.clock += 1
        self.last_used[used] = self.clock

    def _prefetch(self, used: np.ndarray) -> list:
        """Swap in the best-ranked missing experts for the next steps, within a per-step budget."""
        budget = int(self.params["prefetch_per_step"])
        if budget <= 0 or self.score.max() <= 0:
            return []
        missing = ~self.resident & (self.score > 0)
        if not missing.any():
            return []
        # Most promising (layer, expert) pairs first.
        ls, es = np.nonzero(missing)
        order = np.argsort(-self.score[ls, es], kind="stable")
        loaded = []
        for li, ei in zip(ls[order], es[order]):
            if len(loaded) >= budget:
                break
            res = self.resident[li]
            if res.sum() >= self.capacity[li]:
                cand = np.flatnonzero(res & ~used[li])
                if not len(cand):
                    continue
                victim = cand[np.argmin(self.evict_key()[li, cand])]
                if self.score[li, victim] >= self.score[li, ei]:
                    continue   # the resident one is predicted to be as useful
                res[victim] = False
            res[ei] = True
            loaded.append((STEP_START, int(li), int(ei)))
        return loaded
