"""Routing statistics of a trace, with the definitions the README documents.

All statistics are computed per MoE layer and averaged over layers, over the
tokens selected by `tokens` ("all", "prompt" or "decode"):

- gini: Gini coefficient of the expert counts of a layer (0 = uniform).
- top_share: share of selections that go to the layer's top_k most used experts.
- temporal_reuse: for consecutive tokens t, t+1 of one request, |S_t & S_t+1| / k,
  where S is the set of the k experts chosen at that layer (uniform: k / E).
- cross_layer_correlation: normalised mutual information (arithmetic-mean
  normalisation) between a token's top-1 expert at layer l and at layer l+1.
- inter_prompt_correlation: Pearson correlation between the flattened
  (layer x expert) count matrices of consecutive requests of the same task
  (in arrival order), averaged over pairs.
- specialisation: Jensen-Shannon divergence (bits) between two tasks' expert
  distributions at a layer, averaged over layers and task pairs.
- distinct_experts: experts used at least once by a request at a layer.
"""
from __future__ import annotations

import itertools

import numpy as np

from traces.format import Trace

CHUNK = 1_000_000  # tokens per vectorised pass: bounds memory on large traces


def token_mask(t: Trace, tokens: str = "all") -> np.ndarray:
    if tokens == "all":
        return np.ones(t.n_tokens, dtype=bool)
    dec = t.decode_mask()
    if tokens == "decode":
        return dec
    if tokens == "prompt":
        return ~dec
    raise ValueError(f"tokens must be 'all', 'prompt' or 'decode', got {tokens!r}")


def request_counts(t: Trace, mask: np.ndarray) -> np.ndarray:
    """(R, L, E) how often each request chose each expert at each layer."""
    R, L, E = t.n_requests, t.n_layers, t.n_experts
    out = np.zeros(R * L * E, dtype=np.int64)
    req = t.token_request()
    for s in range(0, t.n_tokens, CHUNK):
        sl = slice(s, s + CHUNK)
        m = mask[sl]
        e = t.experts[sl][m].astype(np.int64)                  # (n, L, k)
        base = (req[sl][m][:, None] * L + np.arange(L)[None, :]) * E
        out += np.bincount((base[:, :, None] + e).ravel(), minlength=R * L * E)
    return out.reshape(R, L, E)


def gini(counts: np.ndarray) -> float:
    x = np.sort(np.asarray(counts, dtype=float))
    n = len(x)
    if x.sum() == 0:
        return float("nan")
    # Mean absolute difference over all pairs / (2 * mean), sorted-array form.
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def _layer_counts_stats(layer_counts: np.ndarray, k: int) -> tuple[float, float]:
    g = [gini(c) for c in layer_counts if c.sum()]
    top = [np.sort(c)[::-1][:k].sum() / c.sum() for c in layer_counts if c.sum()]
    return (float(np.mean(g)) if g else float("nan"), float(np.mean(top)) if top else float("nan"))


def temporal_reuse(t: Trace, mask: np.ndarray) -> float:
    """Mean share of a token's experts that the next token of the same request reuses."""
    req = t.token_request()
    total, n = 0.0, 0
    for s in range(0, max(t.n_tokens - 1, 0), CHUNK):
        e = min(s + CHUNK, t.n_tokens - 1)
        a, b = t.experts[s:e], t.experts[s + 1:e + 1]
        ok = (req[s:e] == req[s + 1:e + 1]) & mask[s:e] & mask[s + 1:e + 1]
        if not ok.any():
            continue
        same = (a[ok][:, :, :, None] == b[ok][:, :, None, :]).any(axis=3).sum(axis=2)  # (n, L)
        total += same.sum() / t.top_k
        n += same.size
    return total / n if n else float("nan")


def nmi(x: np.ndarray, y: np.ndarray, n_values: int) -> float:
    joint = np.bincount(x.astype(np.int64) * n_values + y, minlength=n_values * n_values).reshape(n_values, n_values)
    p = joint / joint.sum()
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (px[:, None] * py[None, :])[nz])).sum())
    hx = -float((px[px > 0] * np.log(px[px > 0])).sum())
    hy = -float((py[py > 0] * np.log(py[py > 0])).sum())
    return 2 * mi / (hx + hy) if hx + hy > 0 else float("nan")


def cross_layer_correlation(t: Trace, mask: np.ndarray) -> float:
    if t.n_layers < 2 or not mask.any():
        return float("nan")
    top1 = t.experts[mask, :, 0]
    return float(np.mean([nmi(top1[:, l], top1[:, l + 1], t.n_experts) for l in range(t.n_layers - 1)]))


def inter_prompt_correlation(t: Trace, counts: np.ndarray, task: str | None = None, lag: int = 1) -> float:
    """Mean Pearson correlation of same-task requests' count matrices `lag` apart (1: consecutive)."""
    order = np.argsort(t.arrival_s, kind="stable") if t.arrival_s is not None and not np.isnan(t.arrival_s).any() \
        else np.arange(t.n_requests)
    cors = []
    for task_name in ([task] if task else t.tasks):
        idx = order[t.task[order] == task_name]
        flat = counts[idx].reshape(len(idx), -1).astype(float)
        flat = flat[flat.sum(axis=1) > 0]
        for a, b in zip(flat[:-lag], flat[lag:]):
            if a.std() > 0 and b.std() > 0:
                cors.append(np.corrcoef(a, b)[0, 1])
    return float(np.mean(cors)) if cors else float("nan")


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def trace_stats(t: Trace, tokens: str = "all") -> dict:
    """Every statistic for the whole trace, plus a per-task breakdown."""
    mask = token_mask(t, tokens)
    counts = request_counts(t, mask)
    req = t.token_request()

    def block(sel_req: np.ndarray, task: str | None) -> dict:
        tok = mask & sel_req[req]
        layer_counts = counts[sel_req].sum(axis=0)                       # (L, E)
        g, top = _layer_counts_stats(layer_counts, t.top_k)
        used = counts[sel_req] > 0
        has = counts[sel_req].sum(axis=2) > 0
        return dict(requests=int(sel_req.sum()), tokens=int(tok.sum()), gini=g, top_share=top,
                    temporal_reuse=temporal_reuse(t, tok),
                    cross_layer_correlation=cross_layer_correlation(t, tok),
                    inter_prompt_correlation=inter_prompt_correlation(t, counts, task),
                    distinct_experts=float(used.sum(axis=2)[has].mean()) if has.any() else float("nan"))

    out = block(np.ones(t.n_requests, dtype=bool), None)
    out["tokens_phase"] = tokens
    out["model"] = t.model
    out["shape"] = dict(n_layers=t.n_layers, n_experts=t.n_experts, top_k=t.top_k)
    per_task = {task: block(t.task == task, task) for task in t.tasks}
    dist = {task: counts[t.task == task].sum(axis=0).astype(float) for task in t.tasks}  # (L, E) each
    pairs = list(itertools.combinations(t.tasks, 2))
    spec = {f"{a}|{b}": float(np.mean([js_divergence(dist[a][l], dist[b][l]) for l in range(t.n_layers)
                                       if dist[a][l].sum() and dist[b][l].sum()]))
            for a, b in pairs}
    out["specialisation"] = float(np.mean(list(spec.values()))) if spec else float("nan")
    out["specialisation_pairs"] = spec
    out["per_task"] = per_task
    return out


def popularity(t: Trace, tokens: str = "all") -> dict[str, np.ndarray]:
    """task -> (L, E) share of selections; for heatmaps and calibration checks."""
    counts = request_counts(t, token_mask(t, tokens))
    out = {}
    for task in t.tasks:
        c = counts[t.task == task].sum(axis=0).astype(float)
        out[task] = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    return out


def layer_transitions(t: Trace, tokens: str = "all") -> np.ndarray:
    """(L-1, E, E): P(top-1 at layer l+1 = j | top-1 at layer l = i)."""
    mask = token_mask(t, tokens)
    top1 = t.experts[mask, :, 0].astype(np.int64)
    E = t.n_experts
    out = np.zeros((max(t.n_layers - 1, 0), E, E))
    for l in range(t.n_layers - 1):
        j = np.bincount(top1[:, l] * E + top1[:, l + 1], minlength=E * E).reshape(E, E).astype(float)
        out[l] = j / np.maximum(j.sum(axis=1, keepdims=True), 1)
    return out
