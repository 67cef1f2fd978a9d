"""Per-(request, layer, token) routing rows, as vLLM-based profilers write them.

One JSON object per line:

    {"dataset" | "task": str, "problem_id" | "request_id": str|int, "layer": int,
     "token_idx" | "token_pos" | "position": int, "experts": [int, ...],
     optional "gating_probs": [float, ...], "is_prompt": bool, "prompt_tokens": int}

Rows may come in any order. Which tokens are prompt tokens comes from "prompt_tokens"
(per request, on any row) or "is_prompt" per row; with neither every token counts as
generated (typical of decode-only profilers).

What real profilers get wrong, and what repair=True does about it:
- rows dropped where the router tied, with token indices renumbered within each layer
  (a layer ends up shorter): the short layer is realigned against the nearest complete
  layers (the alignment that agrees best with them, by dynamic programming) and the
  dropped routes are filled from the neighbouring tokens;
- per-decode-step records whose position is 0 at every step (a position repeats):
  that request's tokens are ordered by write order instead;
- one problem id in two datasets: the ids are namespaced as "<task>/<id>";
- a (token, layer) row missing with the others keeping their positions: filled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.format import TraceError
from traces.importer import MISSING, ImportReport, RequestRouting, check_expert_ids, read_jsonl

POSITION_KEYS = ("token_idx", "token_pos", "position")


class _Request:
    __slots__ = ("layers", "seen", "prompt_len", "repeats", "first_line")

    def __init__(self, n_layers: int, lineno: int):
        self.layers = [[] for _ in range(n_layers)]   # per layer: [position, experts, gates, is_prompt] in write order
        self.seen = [dict() for _ in range(n_layers)]  # per layer: position -> line
        self.prompt_len = None
        self.repeats = False
        self.first_line = lineno


def read_rows(path: Path, model, report: ImportReport, task: str | None = None,
              progress=None) -> list[RequestRouting]:
    L, k = model.n_moe_layers, model.top_k
    reqs: dict[tuple[str, str], _Request] = {}
    task_of: dict[str, tuple[str, int]] = {}
    collide: set[str] = set()
    with_gates = None
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        rid = row.get("request_id", row.get("problem_id"))
        task = row.get("task", row.get("dataset"))
        if rid is None:
            raise TraceError(f"{where}: missing 'request_id' (or 'problem_id')")
        if task is None:
            raise TraceError(f"{where}: missing 'task' (or 'dataset')")
        for key in ("layer", "experts"):
            if key not in row:
                raise TraceError(f"{where}: missing '{key}'")
        pos_key = next((p for p in POSITION_KEYS if p in row), None)
        if pos_key is None:
            raise TraceError(f"{where}: missing 'token_idx' (or 'token_pos', 'position')")
        layer, pos, ex = row["layer"], row[pos_key], row["experts"]
        if not isinstance(layer, int) or not 0 <= layer < L:
            raise TraceError(f"{where}: layer {layer!r} out of range 0..{L - 1} for model '{model.name}'")
        if not isinstance(pos, int) or pos < 0:
            raise TraceError(f"{where}: {pos_key} must be a non-negative integer, got {pos!r}")
        if not isinstance(ex, list) or len(ex) != k or not all(isinstance(e, int) for e in ex):
            raise TraceError(f"{where}: 'experts' must list top_k={k} integer ids for '{model.name}', got {ex!r}")
        check_expert_ids(np.array(ex), model, where, allow_missing=False)
        gp = row.get("gating_probs")
        if with_gates is None:
            with_gates = gp is not None
        if (gp is not None) != with_gates:
            raise TraceError(f"{where}: 'gating_probs' given on some rows and not on others; give it on all or none")
        if gp is not None and (not isinstance(gp, list) or len(gp) != k):
            raise TraceError(f"{where}: 'gating_probs' must list {k} weights, got {gp!r}")
        rid, task = str(rid), str(task)
        first = task_of.setdefault(rid, (task, lineno))
        if first[0] != task:
            if not report.repair:
                raise TraceError(f"{where}: request '{rid}' was task '{first[0]}' (line {first[1]}), now '{task}'; "
                                 "is one problem id used in two datasets? rerun with --repair to name them "
                                 "'<task>/<id>'")
            collide.add(rid)
        r = reqs.get((task, rid))
        if r is None:
            r = reqs[(task, rid)] = _Request(L, lineno)
        if pos in r.seen[layer] and not r.repeats:
            if not report.repair:
                raise TraceError(f"{where}: request '{rid}' token {pos} layer {layer} given twice (first on line "
                                 f"{r.seen[layer][pos]}); a position that repeats (per-decode-step records keyed "
                                 f"by a '{pos_key}' that stays 0?) - rerun with --repair to order this request's "
                                 "tokens by write order")
            r.repeats = True
        r.seen[layer].setdefault(pos, lineno)
        if "prompt_tokens" in row:
            r.prompt_len = int(row["prompt_tokens"])
        r.layers[layer].append([pos, ex, gp, bool(row.get("is_prompt", False)), lineno])
        if progress and lineno % 100_000 == 0:
            progress(100_000)
    if not reqs:
        raise TraceError(f"{path}: no routing rows found")

    out = []
    for rid in sorted(collide):
        report.add("repeated request id", rid, "one id in tasks " + ", ".join(sorted(t for t, i in reqs if i == rid))
                   + f": named '<task>/{rid}'")
    for (task, rid), r in sorted(reqs.items(), key=lambda kv: kv[1].first_line):
        name = f"{task}/{rid}" if rid in collide else rid
        out.append(_request(name, task, r, model, report, path, with_gates))
    return out


def _request(name: str, task: str, r: _Request, model, report: ImportReport, path: Path, with_gates: bool):
    L, k = model.n_moe_layers, model.top_k
    empty = [l for l in range(L) if not r.layers[l]]
    if empty:
        raise TraceError(f"{path}: request '{name}' has no rows at all for layer(s) {empty[:5]}; "
                         "every request needs all MoE layers")
    if r.repeats:
        for rows in r.layers:                       # write order is the only order left
            for i, row in enumerate(rows):
                row[0] = i
        report.add("write order", name, f"positions repeat; {max(len(x) for x in r.layers)} tokens ordered by "
                   "write order")
    for rows in r.layers:
        rows.sort(key=lambda x: x[0])
    union = sorted(set().union(*(set(x[0] for x in rows) for rows in r.layers)))
    n = len(union)
    index = {p: i for i, p in enumerate(union)}
    experts = np.full((n, L, k), MISSING, dtype=np.int64)
    gates = np.zeros((n, L, k), dtype=np.float32) if with_gates else None
    short = [l for l in range(L) if len(r.layers[l]) < n and [x[0] for x in r.layers[l]] == union[:len(r.layers[l])]]
    for l in range(L):
        if l in short:
            continue
        for pos, ex, gp, *_ in r.layers[l]:
            experts[index[pos], l] = ex
            if gates is not None:
                gates[index[pos], l] = gp
    holes = (experts == MISSING).any(axis=2)
    holes[:, short] = False
    if holes.any() and not report.repair:
        tok = int(np.flatnonzero(holes.any(axis=1))[0])
        layer = next(l for l in range(L) if not holes[tok, l])
        line = next(x[4] for x in r.layers[layer] if x[0] == union[tok])
        raise TraceError(f"{path}:{line}: request '{name}' token {union[tok]} lacks layer(s) "
                         f"{np.flatnonzero(holes[tok]).tolist()[:5]}; every token needs all MoE layers - rerun "
                         "with --repair to fill missing routes from the neighbouring tokens")
    if short:
        first = short[0]
        if not report.repair:
            m = len(r.layers[first])
            raise TraceError(f"{path}:{r.layers[first][-1][4]}: request '{name}' layer {first} ends at token "
                             f"{union[m - 1]}, other layers reach {union[-1]} (token {union[m]} lacks layer "
                             f"{first}): rows dropped (router ties?) with token indices renumbered within the "
                             "layer - rerun with --repair to realign and fill them")
        complete = [l for l in range(L) if l not in short and not (experts[:, l] == MISSING).any()]
        if not complete:
            raise TraceError(f"{path}: request '{name}': no layer has all {n} tokens, so the dropped rows cannot "
                             "be placed; import a dump that keeps at least one full layer")
        for l in short:
            rows = r.layers[l]
            seq = np.array([x[1] for x in rows], dtype=np.int64)
            at = realign(seq, experts, l, complete)
            experts[at, l] = seq
            if gates is not None:
                gates[at, l] = np.array([x[2] for x in rows], dtype=np.float32)
            gaps = np.setdiff1d(np.arange(n), at)
            report.add("realigned layer", name, f"layer {l}: {len(gaps)} dropped row(s) placed at token(s) "
                       f"{gaps.tolist()[:8]}")
    if r.prompt_len is not None:
        n_prompt = min(r.prompt_len, n)
    else:
        n_prompt = max(sum(1 for x in rows if x[3]) for rows in r.layers)
    return RequestRouting(name, task, experts, gates, n_prompt)


def realign(seq: np.ndarray, experts: np.ndarray, layer: int, complete: list[int], n_ref: int = 2) -> np.ndarray:
    """Token index of each of a short layer's m rows (in order) among n tokens: the monotone
    placement leaving n - m gaps that agrees best with the nearest complete layers
    (shared experts, weighted 1 / layer distance); ties keep rows as early as possible."""
    n, m = len(experts), len(seq)
    G = n - m
    refs = sorted(complete, key=lambda l: (abs(l - layer), l))[:2 * n_ref]
    w = np.array([1.0 / abs(l - layer) for l in refs])
    ref = experts[:, refs]                                       # (n, R, k)
    tok = np.arange(m)[:, None] + np.arange(G + 1)[None, :]     # (m, G+1) candidate token per shift
    same = (seq[:, None, None, :, None] == ref[tok][:, :, :, None, :]).any(axis=4).sum(axis=3)  # (m, G+1, R)
    score = same @ w - 1e-6 * np.arange(G + 1)[None, :]
    # best[g]: best total with the current row at shift g; shifts never decrease along the rows.
    best = score[0].copy()
    back = np.zeros((m, G + 1), dtype=np.int64)
    for j in range(1, m):
        run = np.maximum.accumulate(best)
        new_max = best > np.concatenate([[-np.inf], run[:-1]])     # strictly: ties keep the smaller shift
        back[j] = np.maximum.accumulate(np.where(new_max, np.arange(G + 1), 0))
        best = run + score[j]
    shift = np.empty(m, dtype=np.int64)
    shift[-1] = int(np.argmax(best))
    for j in range(m - 1, 0, -1):
        shift[j - 1] = back[j, shift[j]]
    return np.arange(m) + shift
