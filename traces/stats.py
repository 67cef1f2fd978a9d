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

Structure that decides which expert policy wins. Per-request statistics are
computed within each request and averaged over requests, as real-trace reports
measure them (they carry the small-sample bias of a request's length, so compare
traces at similar lengths):

- request_gini: Gini of one request's expert counts at one layer, averaged over
  requests and layers; effective_experts: exp(entropy) of those counts (how many
  experts a request effectively spreads over; 8 = uniform for Mixtral).
- nmi_by_distance[d]: NMI of a token's top-1 expert at layers l and l+d (d = 1, 2,
  4, 8) within each request, averaged over l and requests: a token that keeps a
  "path" through the layers keeps it high as d grows.
- reuse_by_distance[d]: temporal_reuse between tokens t and t+d of one request
  (d = 1, 2, 4, 8, 16); reuse_by_layer: temporal_reuse (d = 1) per layer;
  reuse_first_layer, reuse_last_layers (mean over the last max(1, L // 8) layers).
- gate_quantiles: quantiles of the top-1 gate as a share of the top-k gates' sum;
  gate_top1_over_0_9: share of (token, layer) routes whose top-1 share exceeds 0.9.
  NaN when the trace's gates are not measured (extra.gates == "absent").
- prompt_decode_divergence: JS divergence (bits) between a request's prompt-token
  and generated-token expert counts, per layer, averaged over layers and the
  requests that have both (always over all tokens).
"""
from __future__ import annotations

import itertools

import numpy as np

from traces.format import Trace

TOKEN_SETS = ("all", "prompt", "decode")   # the tokens a statistic can be taken over
CHUNK = 1_000_000  # tokens per vectorised pass: bounds memory on large traces
NMI_DISTANCES = (1, 2, 4, 8)
REUSE_DISTANCES = (1, 2, 4, 8, 16)
GATE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


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


def _expert_sets(experts: np.ndarray) -> np.ndarray | None:
    """(n, L) bitmask of each token's chosen experts per layer; None above 64 experts."""
    if experts.size and int(experts.max()) >= 64:
        return None
    e = experts.astype(np.uint64)
    sets = np.left_shift(np.uint64(1), e[:, :, 0])
    for j in range(1, e.shape[2]):
        sets |= np.left_shift(np.uint64(1), e[:, :, j])
    return sets


def reuse_by_layer(t: Trace, mask: np.ndarray, distance: int = 1) -> tuple[np.ndarray, int]:
    """Per layer, the mean share of a token's experts that token t+distance of the same
    request also chose; and the number of token pairs measured."""
    req = t.token_request()
    total = np.zeros(t.n_layers)
    n = 0
    for s in range(0, max(t.n_tokens - distance, 0), CHUNK):
        e = min(s + CHUNK, t.n_tokens - distance)
        ok = (req[s:e] == req[s + distance:e + distance]) & mask[s:e] & mask[s + distance:e + distance]
        if not ok.any():
            continue
        a, b = t.experts[s:e][ok], t.experts[s + distance:e + distance][ok]
        sa, sb = _expert_sets(a), _expert_sets(b)
        if sa is not None:
            same = np.bitwise_count(sa & sb)                                    # (n, L)
        else:
            same = (a[:, :, :, None] == b[:, :, None, :]).any(axis=3).sum(axis=2)
        total += same.sum(axis=0) / t.top_k
        n += len(same)
    return (total / n if n else np.full(t.n_layers, np.nan)), n


def temporal_reuse(t: Trace, mask: np.ndarray, distance: int = 1) -> float:
    """Mean share of a token's experts that token t+distance of the same request reuses."""
    per_layer, n = reuse_by_layer(t, mask, distance)
    return float(per_layer.mean()) if n else float("nan")


def nmi(x: np.ndarray, y: np.ndarray, n_values: int) -> float:
    joint = np.bincount(x.astype(np.int64) * n_values + y, minlength=n_values * n_values).reshape(n_values, n_values)
    p = joint / joint.sum()
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (px[:, None] * py[None, :])[nz])).sum())
    hx = -float((px[px > 0] * np.log(px[px > 0])).sum())
    hy = -float((py[py > 0] * np.log(py[py > 0])).sum())
    return 2 * mi / (hx + hy) if hx + hy > 0 else float("nan")


def cross_layer_correlation(t: Trace, mask: np.ndarray, distance: int = 1) -> float:
    """Mean NMI of a token's top-1 expert at layer l and at layer l+distance."""
    if t.n_layers <= distance or not mask.any():
        return float("nan")
    top1 = t.experts[mask, :, 0]
    return float(np.mean([nmi(top1[:, l], top1[:, l + distance], t.n_experts)
                          for l in range(t.n_layers - distance)]))


def _rows_used(counts: np.ndarray) -> np.ndarray:
    c = counts.reshape(-1, counts.shape[-1]).astype(float)
    return c[c.sum(axis=1) > 0]


def request_gini(counts: np.ndarray) -> float:
    """Gini of each (request, layer) row of an (R, L, E) count array, averaged over rows used."""
    c = _rows_used(counts)
    if not len(c):
        return float("nan")
    x = np.sort(c, axis=1)
    n = x.shape[1]
    return float(((x @ (2 * np.arange(1, n + 1) - n - 1)) / (n * x.sum(axis=1))).mean())


def effective_experts(counts: np.ndarray) -> float:
    """exp(entropy) of each (request, layer) row of expert counts, averaged over rows used."""
    c = _rows_used(counts)
    if not len(c):
        return float("nan")
    p = c / c.sum(axis=1, keepdims=True)
    h = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
    return float(np.exp(h).mean())


def _mi_rows(joint: np.ndarray) -> np.ndarray:
    """NMI (arithmetic normalisation) of each (E, E) joint count table in an (n, E, E) stack."""
    n = joint.sum(axis=(1, 2), keepdims=True).astype(float)
    p = joint / np.maximum(n, 1)
    px, py = p.sum(axis=2), p.sum(axis=1)
    outer = px[:, :, None] * py[:, None, :]
    mi = (p * np.log(np.where(p > 0, p, 1) / np.where(p > 0, outer, 1))).sum(axis=(1, 2))
    hx = -(px * np.log(np.where(px > 0, px, 1))).sum(axis=1)
    hy = -(py * np.log(np.where(py > 0, py, 1))).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hx + hy > 0, 2 * mi / (hx + hy), np.nan)


def request_nmi_pairs(t: Trace, mask: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Within-request NMI of top-1 experts at each layer pair (a, b): each request's NMI,
    averaged over the requests with at least two selected tokens."""
    out = np.full(len(pairs), np.nan)
    if not mask.any() or not pairs:
        return out
    E = t.n_experts
    req_all = t.token_request()[mask]
    top1 = t.experts[mask, :, 0].astype(np.int64)
    used = np.flatnonzero(np.bincount(req_all, minlength=t.n_requests) >= 2)
    if not len(used):
        return out
    slot = np.full(t.n_requests, -1)
    slot[used] = np.arange(len(used))
    keep = slot[req_all] >= 0
    req, top1 = slot[req_all[keep]], top1[keep]
    group = max(1, 4_000_000 // (E * E))        # requests per bincount: bounds its memory
    total = np.zeros(len(pairs))
    for g0 in range(0, len(used), group):
        sel = (req >= g0) & (req < g0 + group)
        r, x = req[sel] - g0, top1[sel]
        n_r = min(group, len(used) - g0)
        for i, (a, b) in enumerate(pairs):
            joint = np.bincount((r * E + x[:, a]) * E + x[:, b], minlength=n_r * E * E)
            total[i] += np.nan_to_num(_mi_rows(joint.reshape(n_r, E, E))).sum()
    return total / len(used)


def request_nmi(t: Trace, mask: np.ndarray, distance: int) -> float:
    """Within-request NMI of top-1 experts `distance` layers apart: mean over layers of
    each request's NMI, then over requests with at least two selected tokens."""
    if t.n_layers <= distance:
        return float("nan")
    return float(np.mean(request_nmi_pairs(t, mask, [(l, l + distance) for l in range(t.n_layers - distance)])))


def layer_connectivity(t: Trace, mask: np.ndarray, max_distance: int) -> np.ndarray:
    """Per layer, its mean within-request NMI with the layers up to max_distance away."""
    L = t.n_layers
    pairs = [(a, b) for a in range(L) for b in range(a + 1, min(L, a + max_distance + 1))]
    m = np.full((L, L), np.nan)
    for (a, b), v in zip(pairs, request_nmi_pairs(t, mask, pairs)):
        m[a, b] = m[b, a] = v
    with np.errstate(invalid="ignore"):
        return np.nanmean(m, axis=1) if pairs else np.full(L, np.nan)


def gates_measured(t: Trace) -> bool:
    return t.extra.get("gates") != "absent"


def gate_stats(t: Trace, mask: np.ndarray) -> dict:
    """Quantiles of the top-1 gate's share of the top-k gates, over (token, layer) routes."""
    nan = dict(gate_quantiles={str(q): float("nan") for q in GATE_QUANTILES}, gate_top1_over_0_9=float("nan"))
    if not gates_measured(t) or not mask.any():
        return nan
    parts = []
    for s in range(0, t.n_tokens, CHUNK):
        g = t.gates[s:s + CHUNK][mask[s:s + CHUNK]].astype(np.float32)
        share = g[:, :, 0] / np.maximum(g.sum(axis=2), 1e-9)
        parts.append(share.ravel())
    share = np.concatenate(parts)
    q = np.quantile(share, GATE_QUANTILES)
    return dict(gate_quantiles={str(k): float(v) for k, v in zip(GATE_QUANTILES, q)},
                gate_top1_over_0_9=float((share > 0.9).mean()))


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence (bits) between matching rows of two count arrays (..., E)."""
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)
    q = q / np.maximum(q.sum(axis=-1, keepdims=True), 1e-12)
    m = (p + q) / 2

    def kl(a):
        return (a * np.log2(np.where(a > 0, a, 1) / np.where(a > 0, m, 1))).sum(axis=-1)
    return 0.5 * kl(p) + 0.5 * kl(q)


def prompt_decode_divergence(t: Trace, task: str | None = None) -> float:
    """JS divergence (bits) between each request's prompt-token and generated-token expert
    counts, per layer, averaged over layers, then over the requests that have both."""
    dec = t.decode_mask()
    sel = (t.prompt_tokens > 0) & (t.output_tokens > 0)
    if task:
        sel &= t.task == task
    if not sel.any():
        return float("nan")
    cp, cd = request_counts(t, ~dec)[sel], request_counts(t, dec)[sel]
    return float(_js_rows(cp.astype(float), cd.astype(float)).mean())


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


def structure_stats(t: Trace, tok: np.ndarray, counts: np.ndarray) -> dict:
    """The statistics of policy-relevant structure over the tokens `tok` (see module doc)."""
    reuse = {d: reuse_by_layer(t, tok, d) for d in REUSE_DISTANCES}
    by_layer = reuse[1][0]
    last = max(1, t.n_layers // 8)
    out = dict(request_gini=request_gini(counts), effective_experts=effective_experts(counts),
               nmi_by_distance={str(d): request_nmi(t, tok, d) for d in NMI_DISTANCES},
               reuse_by_distance={str(d): float(r.mean()) if n else float("nan") for d, (r, n) in reuse.items()},
               reuse_by_layer=[float(x) for x in by_layer],
               reuse_first_layer=float(by_layer[0]),
               reuse_last_layers=float(by_layer[-last:].mean()))
    out.update(gate_stats(t, tok))
    return out


def reuse_floor_by_layer(counts: np.ndarray, top_k: int) -> np.ndarray:
    """Per layer, the temporal_reuse two distinct tokens of one request would show if its
    tokens were shuffled: sum_e n_e (n_e - 1) / (N (N - 1)) / k from its (R, L, E) counts,
    averaged over requests weighted by their N - 1 token pairs. Reuse above it is temporal."""
    c = counts.astype(float)
    n = c.sum(axis=2) / top_k                                         # (R, L) tokens
    pairs = n * (n - 1)
    same = (c * (c - 1)).sum(axis=2) / np.where(pairs > 0, pairs, 1) / top_k
    w = np.maximum(n - 1, 0)
    return (same * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-12)


def summary_stats(t: Trace, tokens: str = "all", sel_req: np.ndarray | None = None, task: str | None = None,
                  mask: np.ndarray | None = None, counts: np.ndarray | None = None) -> dict:
    """The statistics of the requests `sel_req` (default all) over the tokens chosen."""
    mask = token_mask(t, tokens) if mask is None else mask
    counts = request_counts(t, mask) if counts is None else counts
    sel_req = np.ones(t.n_requests, dtype=bool) if sel_req is None else sel_req
    tok = mask & sel_req[t.token_request()]
    layer_counts = counts[sel_req].sum(axis=0)                       # (L, E)
    g, top = _layer_counts_stats(layer_counts, t.top_k)
    used = counts[sel_req] > 0
    has = counts[sel_req].sum(axis=2) > 0
    d = dict(requests=int(sel_req.sum()), tokens=int(tok.sum()), gini=g, top_share=top,
             temporal_reuse=temporal_reuse(t, tok),
             cross_layer_correlation=cross_layer_correlation(t, tok),
             inter_prompt_correlation=inter_prompt_correlation(t, counts, task),
             distinct_experts=float(used.sum(axis=2)[has].mean()) if has.any() else float("nan"))
    d.update(structure_stats(t, tok, counts[sel_req]))
    d["reuse_floor_by_layer"] = [float(x) for x in reuse_floor_by_layer(counts[sel_req], t.top_k)]
    d["prompt_decode_divergence"] = prompt_decode_divergence(t, task)
    if task is None:
        d["specialisation_pairs"] = task_divergence(t, counts)
        d["specialisation"] = float(np.mean(list(d["specialisation_pairs"].values()))) \
            if d["specialisation_pairs"] else float("nan")
    return d


def task_divergence(t: Trace, counts: np.ndarray) -> dict:
    """'a|b' -> JS divergence (bits) of the two tasks' pooled expert counts, averaged over layers."""
    dist = {task: counts[t.task == task].sum(axis=0).astype(float) for task in t.tasks}  # (L, E) each
    return {f"{a}|{b}": float(np.mean([js_divergence(dist[a][l], dist[b][l]) for l in range(t.n_layers)
                                       if dist[a][l].sum() and dist[b][l].sum()]))
            for a, b in itertools.combinations(t.tasks, 2)}


def trace_stats(t: Trace, tokens: str = "all") -> dict:
    """Every statistic for the whole trace, plus a per-task breakdown."""
    mask = token_mask(t, tokens)
    counts = request_counts(t, mask)
    out = summary_stats(t, tokens, mask=mask, counts=counts)
    out["tokens_phase"] = tokens
    out["model"] = t.model
    out["shape"] = dict(n_layers=t.n_layers, n_experts=t.n_experts, top_k=t.top_k)
    out["gates_measured"] = gates_measured(t)
    sel = t.output_tokens if tokens == "decode" else t.prompt_tokens if tokens == "prompt" else \
        t.prompt_tokens + t.output_tokens
    out["tokens_per_request"] = dict(mean=float(sel.mean()) if len(sel) else float("nan"),
                                     min=int(sel.min()) if len(sel) else 0, max=int(sel.max()) if len(sel) else 0)
    out["per_task"] = {task: summary_stats(t, tokens, t.task == task, task, mask, counts) for task in t.tasks}
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
