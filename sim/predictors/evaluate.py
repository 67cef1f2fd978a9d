"""Train/evaluate split by request, and precision/recall/F1 per layer on held-out requests.

For an evaluated request and layer: the predicted set is the top m experts of the
predictor's f (m = half the experts by default); the true set is the experts the
request routed at least its uniform share to (share >= 1/E). Precision, recall
and F1 compare the two sets; coverage is the share of the request's routes that
the predicted set serves (what a policy loading those m experts would keep).
History for a request is the routing of the earlier requests of its task in the
trace, as a server would have observed it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from sim.predictors.base import request_shares
from sim.predictors.overlap import seen_requests


def split_requests(trace, holdout: float = 0.2, seed: int = 0):
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    order = np.random.default_rng(seed).permutation(trace.n_requests)
    n_eval = max(int(round(holdout * trace.n_requests)), 1)
    if n_eval >= trace.n_requests:
        raise ValueError(f"a trace of {trace.n_requests} requests is too small to hold out {holdout:.0%}")
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def evaluate(pred, trace, eval_idx, m: int | None = None) -> pd.DataFrame:
    seen = np.intersect1d(seen_requests(trace, pred.train_ids, pred.train_digests), eval_idx)
    if len(seen):
        raise ValueError(f"{len(seen)} evaluated request(s) were used to train the predictor "
                         f"(e.g. '{trace.request_id[seen[0]]}'); evaluate on held-out requests only")
    shares = request_shares(trace)
    L, E = trace.n_layers, trace.n_experts
    m = m or max(E // 2, 1)
    rows = []
    hist: dict[str, list] = {}
    eval_set = set(int(i) for i in eval_idx)
    for i in range(trace.n_requests):
        task = str(trace.task[i])
        if i in eval_set:
            f = pred.predict(task, hist.get(task, []), upcoming=[i])
            top = np.argsort(-f, axis=1, kind="stable")[:, :m]
            pred_set = np.zeros((L, E), dtype=bool)
            np.put_along_axis(pred_set, top, True, axis=1)
            true_set = shares[i] >= 1.0 / E - 1e-12
            tp = (pred_set & true_set).sum(axis=1)
            prec = tp / m
            rec = np.where(true_set.sum(axis=1) > 0, tp / np.maximum(true_set.sum(axis=1), 1), 1.0)
            f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
            cov = (shares[i] * pred_set).sum(axis=1)
            for layer in range(L):
                rows.append((i, task, layer, prec[layer], rec[layer], f1[layer], cov[layer]))
        hist.setdefault(task, []).append(shares[i])
    return pd.DataFrame(rows, columns=["request", "task", "layer", "precision", "recall", "f1", "coverage"])


def summary_by_layer(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("layer")[["precision", "recall", "f1", "coverage"]].mean()
