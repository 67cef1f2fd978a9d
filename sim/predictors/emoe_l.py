"""eMoE-L: layer i from layer i-1.

Transitions T_i (expert at layer i-1 -> expert at layer i, from training tokens)
carry the previous request's layer i-1 shares to layer i:
f_i = alpha * normalise(prev_{i-1} @ T_i) + (1 - alpha) * prior_i, and
f_0 from the previous request's layer 0 as in eMoE-A. alpha fitted as in eMoE-A.
"""
import numpy as np

from sim.predictors.base import ExpertPredictor, normalise, pairs_by_task
from sim.predictors.emoe_a import ALPHAS, coverage


class EmoeLPredictor(ExpertPredictor):
    kind = "emoe_l"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.alpha = 0.5
        self.trans = None   # (L, E, E)

    def _fit(self, trace, train_idx, shares):
        sub = trace.subset(train_idx)
        L, E = self.L, self.E
        ex = sub.experts.astype(np.int64)
        trans = np.ones((L, E, E))    # add-one smoothing
        for i in range(1, L):
            a = np.repeat(ex[:, i - 1, :], ex.shape[2], axis=1).ravel()
            b = np.tile(ex[:, i, :], (1, ex.shape[2])).ravel()
            trans[i] += np.bincount(a * E + b, minlength=E * E).reshape(E, E)
        self.trans = trans / trans.sum(axis=2, keepdims=True)
        pos = {int(r): k for k, r in enumerate(train_idx)}
        pairs = [(pos[a], pos[b]) for a, b in pairs_by_task(trace, train_idx)]
        if not pairs:
            return
        m = max(E // 2, 1)
        prev = shares[[a for a, _ in pairs]]
        nxt = shares[[b for _, b in pairs]]
        prior = np.stack([self.task_prior(str(trace.task[train_idx[b]])) for _, b in pairs])
        carried = self._carry(prev)
        scores = [coverage(al * carried + (1 - al) * prior, nxt, m) for al in ALPHAS]
        self.alpha = float(ALPHAS[int(np.argmax(scores))])

    def _carry(self, prev: np.ndarray) -> np.ndarray:
        """(..., L, E) shares -> layer i predicted from layer i-1 (layer 0 kept)."""
        out = prev.copy()
        out[..., 1:, :] = normalise(np.einsum("...le,lef->...lf", prev[..., :-1, :], self.trans[1:]))
        return out

    def predict(self, task, history, upcoming=None):
        prior = self.task_prior(task)
        if not history:
            return prior
        return normalise(self.alpha * self._carry(normalise(history[-1])) + (1 - self.alpha) * prior)

    def arrays(self):
        return {"alpha": np.array(self.alpha), "trans": self.trans}

    def load_arrays(self, arrays):
        self.alpha = float(arrays["alpha"])
        self.trans = arrays["trans"]
