"""Learned predictor: a small residual MLP, in numpy (so `sim` needs no torch).

    logits = log(task prior) + W2 relu(W1 [prev shares, task prior] + b1) + b2,
    f = softmax per layer

The paper's predictor is a ~0.1B-parameter transformer over earlier prompts; on
traces of hundreds of requests that would only memorise. A one-hidden-layer MLP
over the previous request's layer x expert shares is the smallest model that can
learn which experts recur beyond the task mean. W2 starts at zero, so before
training it *is* the frequency baseline, and it keeps whichever of the two does
better on a held-out tenth of the training pairs (early stopping) - so it never
silently does worse than the baseline it corrects.
"""
import numpy as np

from sim.predictors.base import ExpertPredictor, normalise, pairs_by_task


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class MLPPredictor(ExpertPredictor):
    kind = "mlp"
    DEFAULTS = dict(hidden=64, epochs=200, lr=3e-3, weight_decay=1e-4, seed=0)

    def __init__(self, *a, **kw):
        super().__init__(*a, **{**self.DEFAULTS, **kw})
        self.w = None

    def _features(self, prev, prior):
        return np.concatenate([prev.reshape(len(prev), -1), prior.reshape(len(prior), -1)], axis=1)

    def _forward(self, w, x, prior):
        h = np.maximum(x @ w["W1"] + w["b1"], 0)
        z = np.log(prior.reshape(len(prior), -1) + 1e-6) + h @ w["W2"] + w["b2"]
        return h, _softmax(z.reshape(len(x), self.L, self.E))

    def _loss(self, w, x, prior, target):
        _, p = self._forward(w, x, prior)
        return float(-(target * np.log(p + 1e-9)).sum(axis=(1, 2)).mean())

    def _fit(self, trace, train_idx, shares):
        pos = {int(r): k for k, r in enumerate(train_idx)}
        pairs = [(pos[a], pos[b]) for a, b in pairs_by_task(trace, train_idx)]
        p = self.params
        rng = np.random.default_rng(p["seed"])
        d_in, d_out = 2 * self.L * self.E, self.L * self.E
        w = {"W1": rng.normal(0, np.sqrt(2 / d_in), (d_in, p["hidden"])), "b1": np.zeros(p["hidden"]),
             "W2": np.zeros((p["hidden"], d_out)), "b2": np.zeros(d_out)}
        self.w = w
        if len(pairs) < 10:
            return
        prev = shares[[a for a, _ in pairs]]
        nxt = shares[[b for _, b in pairs]]
        prior = np.stack([self.task_prior(str(trace.task[train_idx[b]])) for _, b in pairs])
        x = self._features(prev, prior)
        order = rng.permutation(len(pairs))
        n_val = max(len(pairs) // 10, 2)
        val, tr = order[:n_val], order[n_val:]
        best, best_w = self._loss(w, x[val], prior[val], nxt[val]), {k: v.copy() for k, v in w.items()}
        m = {k: np.zeros_like(v) for k, v in w.items()}
        v2 = {k: np.zeros_like(v) for k, v in w.items()}
        for step in range(1, p["epochs"] + 1):   # full-batch Adam: the data are small
            h, prob = self._forward(w, x[tr], prior[tr])
            g_z = (prob - nxt[tr]).reshape(len(tr), -1) / len(tr)
            grads = {"W2": h.T @ g_z, "b2": g_z.sum(0)}
            g_h = (g_z @ w["W2"].T) * (h > 0)
            grads["W1"] = x[tr].T @ g_h
            grads["b1"] = g_h.sum(0)
            for k in w:
                g = grads[k] + p["weight_decay"] * w[k]
                m[k] = 0.9 * m[k] + 0.1 * g
                v2[k] = 0.999 * v2[k] + 0.001 * g * g
                w[k] -= p["lr"] * (m[k] / (1 - 0.9 ** step)) / (np.sqrt(v2[k] / (1 - 0.999 ** step)) + 1e-8)
            if step % 10 == 0:
                loss = self._loss(w, x[val], prior[val], nxt[val])
                if loss < best:
                    best, best_w = loss, {k: v.copy() for k, v in w.items()}
        self.w = best_w

    def predict(self, task, history, upcoming=None):
        prior = self.task_prior(task)
        if not history or self.w is None:
            return prior
        prev = normalise(history[-1])[None]
        _, p = self._forward(self.w, self._features(prev, prior[None]), prior[None])
        return p[0]

    def arrays(self):
        return {f"w__{k}": v for k, v in self.w.items()}

    def load_arrays(self, arrays):
        self.w = {k[3:]: v for k, v in arrays.items() if k.startswith("w__")}
