"""Expert predictors: from earlier prompts' routing, the expert frequencies of the next.

A predictor answers, for a task and the routing history of that task's earlier
requests, f: (layers, experts) expected share of the next request's routes per
layer (rows sum to 1). The eMoE policy turns f into which experts to load.

Every predictor is fitted on a set of training requests of a trace (never the
requests it is evaluated on) and saved to / loaded from one .npz file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from sim.predictors.overlap import request_digests
from traces.stats import request_counts, token_mask


def normalise(c: np.ndarray) -> np.ndarray:
    """Rows (last axis) to shares; an all-zero row becomes uniform."""
    c = np.asarray(c, dtype=float)
    s = c.sum(axis=-1, keepdims=True)
    out = np.where(s > 0, c / np.where(s > 0, s, 1), 1.0 / c.shape[-1])
    return out


def request_shares(trace) -> np.ndarray:
    """(R, L, E) each request's share of routes per expert per layer (all its tokens)."""
    return normalise(request_counts(trace, token_mask(trace, "all")))


class ExpertPredictor:
    kind = "base"

    def __init__(self, n_layers: int = 0, n_experts: int = 0, **params):
        self.L, self.E = n_layers, n_experts
        self.params = params
        self.prior: dict[str, np.ndarray] = {}     # task -> (L, E) training frequencies
        self.global_prior: np.ndarray | None = None
        self.train_ids: list[str] = []          # the training requests' ids in their trace
        self.train_digests: list[str] = []      # and their routing digests (overlap.request_digests)
        self.model = ""

    # ---- fitting -----------------------------------------------------------------
    def fit(self, trace, train_idx) -> ExpertPredictor:
        train_idx = np.asarray(train_idx, dtype=np.int64)
        self.L, self.E, self.model = trace.n_layers, trace.n_experts, trace.model
        self.train_ids = trace.request_id[train_idx].tolist()
        self.train_digests = request_digests(trace, train_idx)
        shares = request_shares(trace.subset(train_idx))
        tasks = trace.task[train_idx]
        for task in sorted(set(tasks.tolist())):
            self.prior[task] = normalise(shares[tasks == task].mean(axis=0))
        self.global_prior = normalise(shares.mean(axis=0))
        self._fit(trace, train_idx, shares)
        return self

    def _fit(self, trace, train_idx, shares) -> None:
        """Extra fitting of a subclass; shares[i] belongs to train_idx[i]."""

    def task_prior(self, task: str) -> np.ndarray:
        p = self.prior.get(task)
        return p if p is not None else self.global_prior

    # ---- prediction -----------------------------------------------------------------
    def predict(self, task: str, history: list, upcoming=None) -> np.ndarray:
        """history: (L, E) count matrices of the task's earlier requests, oldest first."""
        raise NotImplementedError

    # ---- files ------------------------------------------------------------------------
    def arrays(self) -> dict:
        return {}

    def load_arrays(self, arrays: dict) -> None:
        pass

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(kind=self.kind, n_layers=self.L, n_experts=self.E, model=self.model, params=self.params,
                    tasks=sorted(self.prior), train_ids=self.train_ids, train_digests=self.train_digests)
        arrays = {f"prior__{t}": p for t, p in self.prior.items()}
        arrays["global_prior"] = self.global_prior
        arrays.update(self.arrays())
        if path.suffix != ".npz":       # as np.savez names it; the path returned is the file written
            path = path.with_name(path.name + ".npz")
        # Written beside, then renamed: a crash leaves the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def pairs_by_task(trace, idx) -> list[tuple[int, int]]:
    """(previous, next) request pairs of the same task among idx, in trace order."""
    out = []
    last: dict[str, int] = {}
    for i in sorted(int(x) for x in idx):
        t = str(trace.task[i])
        if t in last:
            out.append((last[t], i))
        last[t] = i
    return out
