"""Import routing JSONL as emitted by vLLM-based profilers into an emoe trace.

One JSON object per line, one line per (request, layer, token):

    {"dataset" | "task": str, "problem_id" | "request_id": str|int,
     "layer": int, "token_idx": int, "experts": [int, ...], "gating_probs": [float, ...],
     optional "is_prompt": bool, "prompt_tokens": int}

Tokens of a request are ordered by token_idx. Which tokens are prompt tokens is
taken from "prompt_tokens" (per request, on any row), or "is_prompt" per row; if
neither is present every token counts as generated (typical of decode-only
profilers). Every request must give every layer for every token it lists.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from sim.models import ModelSpec, get_model
from traces.format import Trace, TraceError, expert_dtype, validate


def import_jsonl(path, model: str | ModelSpec, progress=None) -> Trace:
    model = get_model(model)
    path = Path(path)
    if not path.exists():
        raise TraceError(f"routing file '{path}' does not exist")
    L, E, k = model.n_moe_layers, model.n_experts, model.top_k
    # request -> token_idx -> (experts (L,k), gates (L,k), filled layer mask)
    reqs: dict[str, dict] = {}
    task_of: dict[str, str] = {}
    prompt_len: dict[str, int] = {}
    prompt_flags: dict[str, dict[int, bool]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TraceError(f"{where}: expected a JSON object per line")
            rid = row.get("request_id", row.get("problem_id"))
            task = row.get("task", row.get("dataset"))
            if rid is None:
                raise TraceError(f"{where}: missing 'request_id' (or 'problem_id')")
            if task is None:
                raise TraceError(f"{where}: missing 'task' (or 'dataset')")
            for key in ("layer", "token_idx", "experts", "gating_probs"):
                if key not in row:
                    raise TraceError(f"{where}: missing '{key}'")
            layer, tok, ex, gp = row["layer"], row["token_idx"], row["experts"], row["gating_probs"]
            if not isinstance(layer, int) or not 0 <= layer < L:
                raise TraceError(f"{where}: layer {layer!r} out of range 0..{L - 1} for model '{model.name}'")
            if not isinstance(tok, int) or tok < 0:
                raise TraceError(f"{where}: token_idx must be a non-negative integer, got {tok!r}")
            if not isinstance(ex, list) or len(ex) != k:
                raise TraceError(f"{where}: 'experts' must list top_k={k} ids for '{model.name}', got {ex!r}")
            if not isinstance(gp, list) or len(gp) != k:
                raise TraceError(f"{where}: 'gating_probs' must list {k} weights, got {gp!r}")
            if any((not isinstance(e, int)) or e < 0 or e >= E for e in ex):
                raise TraceError(f"{where}: expert ids {ex} out of range 0..{E - 1} for model '{model.name}'")
            rid = str(rid)
            if task_of.setdefault(rid, str(task)) != str(task):
                raise TraceError(f"{where}: request '{rid}' was task '{task_of[rid]}', now '{task}'")
            if "prompt_tokens" in row:
                prompt_len[rid] = int(row["prompt_tokens"])
            if "is_prompt" in row:
                prompt_flags[rid][tok] = bool(row["is_prompt"])
            toks = reqs.setdefault(rid, {})
            if tok not in toks:
                toks[tok] = (np.zeros((L, k), np.int64), np.zeros((L, k), np.float32), np.zeros(L, bool))
            e_arr, g_arr, seen = toks[tok]
            if seen[layer]:
                raise TraceError(f"{where}: request '{rid}' token {tok} layer {layer} given twice")
            e_arr[layer], g_arr[layer], seen[layer] = ex, gp, True
            if progress and lineno % 100_000 == 0:
                progress(100_000)
    if not reqs:
        raise TraceError(f"{path}: no routing rows found")

    ids = list(reqs)
    experts, gates, n_prompt, n_out = [], [], [], []
    for rid in ids:
        toks = reqs[rid]
        order = sorted(toks)
        for tok in order:
            missing = np.flatnonzero(~toks[tok][2])
            if len(missing):
                raise TraceError(f"{path}: request '{rid}' token {tok} lacks layer(s) {missing.tolist()[:5]}; "
                                 "every token needs all MoE layers")
        experts.append(np.stack([toks[t][0] for t in order]))
        gates.append(np.stack([toks[t][1] for t in order]))
        if rid in prompt_len:
            p = min(prompt_len[rid], len(order))
        else:
            p = sum(1 for t in order if prompt_flags[rid].get(t, False))
        n_prompt.append(p)
        n_out.append(len(order) - p)
    t = Trace(model.name, L, E, k, np.array(ids), np.array([task_of[r] for r in ids]), n_prompt, n_out,
              np.concatenate(experts).astype(expert_dtype(E)), np.concatenate(gates).astype(np.float16),
              extra=dict(imported_from=path.name))
    validate(t, str(path))
    return t
