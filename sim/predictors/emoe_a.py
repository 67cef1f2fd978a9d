"""eMoE-A: all layers of the next prompt from the previous prompt's routing.

f = alpha * shares(previous request of the task) + (1 - alpha) * task prior;
alpha is fitted on training pairs of consecutive same-task requests to maximise
the routes covered by the predicted top half of experts.
"""
import numpy as np

from sim.predictors.base import ExpertPredictor, normalise, pairs_by_task

ALPHAS = np.linspace(0, 1, 11)


def coverage(f: np.ndarray, actual: np.ndarray, m: int) -> float:
    """Share of `actual` routes that fall on the top-m experts of f, averaged over layers."""
    top = np.argsort(-f, axis=-1, kind="stable")[..., :m]
    return float(np.take_along_axis(actual, top, axis=-1).sum(axis=-1).mean())


class EmoeAPredictor(ExpertPredictor):
    kind = "emoe_a"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.alpha = 0.5

    def _fit(self, trace, train_idx, shares):
        pos = {int(r): i for i, r in enumerate(train_idx)}
        pairs = [(pos[a], pos[b]) for a, b in pairs_by_task(trace, train_idx)]
        if not pairs:
            return
        m = max(self.E // 2, 1)
        prev = shares[[a for a, _ in pairs]]
        nxt = shares[[b for _, b in pairs]]
        prior = np.stack([self.task_prior(str(trace.task[train_idx[b]])) for _, b in pairs])
        scores = [coverage(al * prev + (1 - al) * prior, nxt, m) for al in ALPHAS]
        self.alpha = float(ALPHAS[int(np.argmax(scores))])

    def predict(self, task, history, upcoming=None):
        prior = self.task_prior(task)
        if not history:
            return prior
        return normalise(self.alpha * normalise(history[-1]) + (1 - self.alpha) * prior)

    def arrays(self):
        return {"alpha": np.array(self.alpha)}

    def load_arrays(self, arrays):
        self.alpha = float(arrays["alpha"])
