"""Megatron-core's router trace (`--moe-routing-trace-path`): router_trace_rank<R>.jsonl.

One record per (step, block, layer):

    {"step": int, "stage": "pre_dispatch", "block": "decoder" | "mtp", "layer": int,
     "rank": int, "num_tokens": int, "topk": int, "top_indices": [[int] * topk] * num_tokens}

Records carry no request ids, so requests are read from the steps of one inference
run (one file, one rank): step 0 is the prefill and each later step one decode token
per request. The number of requests B is the decode steps' num_tokens; the prefill's
tokens are split as Megatron's static batching lays them out, sequence-major
(token i is request i mod B, position i div B). When every step has the prefill's
token count (a training trace, or repeated prefills), each step is one request of
prompt tokens. MTP records are left out (they are not the model's MoE layers); layer
numbers are mapped in order onto the model's MoE layers. Gates are absent (the
trace holds indices only). A step missing a layer is an error, or with --repair its
routes are filled from the neighbouring tokens.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from traces.format import TraceError
from traces.importer import DEFAULT_TASK, MISSING, ImportReport, RequestRouting, check_expert_ids, read_jsonl


def read_megatron(path: Path, model, report: ImportReport, task: str | None,
                  progress=None) -> list[RequestRouting]:
    L, k = model.n_moe_layers, model.top_k
    steps: dict[int, dict[int, tuple[np.ndarray, int]]] = defaultdict(dict)
    skipped = 0
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("step", "layer", "top_indices"):
            if key not in rec:
                raise TraceError(f"{where}: missing '{key}'")
        if rec.get("block", "decoder") != "decoder":
            skipped += 1
            continue
        try:
            idx = np.asarray(rec["top_indices"], dtype=np.int64)
        except (ValueError, TypeError):
            raise TraceError(f"{where}: 'top_indices' must be a [num_tokens][topk] list of expert ids") from None
        if idx.ndim != 2 or idx.shape[1] != k:
            raise TraceError(f"{where}: 'top_indices' has shape {list(idx.shape)}, expected [num_tokens, {k}] "
                             f"for model '{model.name}' (top_k={k})")
        if "num_tokens" in rec and rec["num_tokens"] != len(idx):
            raise TraceError(f"{where}: num_tokens {rec['num_tokens']} but {len(idx)} rows of top_indices")
        check_expert_ids(idx, model, where, allow_missing=False)
        step, layer = int(rec["step"]), int(rec["layer"])
        if layer in steps[step]:
            raise TraceError(f"{where}: step {step} layer {layer} given twice (first on line "
                             f"{steps[step][layer][1]}); one file per rank and run")
        steps[step][layer] = (idx, lineno)
    if skipped:
        report.notes.append(f"{skipped} MTP record(s) left out")
    if not steps:
        raise TraceError(f"{path}: no decoder router records found")
    layer_ids = sorted(set().union(*(s.keys() for s in steps.values())))
    if len(layer_ids) != L:
        raise TraceError(f"{path}: the trace has {len(layer_ids)} router layers {layer_ids[:8]}..., model "
                         f"'{model.name}' has {L} MoE layers; is this the right model?")
    slot = {lid: i for i, lid in enumerate(layer_ids)}
    if layer_ids != list(range(L)):
        report.notes.append(f"router layers {layer_ids[0]}..{layer_ids[-1]} mapped onto MoE layers 0..{L - 1}")

    order = sorted(steps)
    routing = []                 # per step: (num_tokens, L, k) with MISSING where a layer is absent
    for step in order:
        recs = steps[step]
        sizes = {len(v[0]) for v in recs.values()}
        if len(sizes) != 1:
            raise TraceError(f"{path}: step {step} has layers with different token counts {sorted(sizes)}")
        absent = [lid for lid in layer_ids if lid not in recs]
        if absent and not report.repair:
            line = min(v[1] for v in recs.values())
            raise TraceError(f"{path}:{line}: step {step} lacks router layer(s) {absent[:5]}; rerun with --repair "
                             "to fill their routes from the neighbouring tokens")
        a = np.full((sizes.pop(), L, k), MISSING, dtype=np.int64)
        for lid, (idx, _) in recs.items():
            a[:, slot[lid]] = idx
        routing.append(a)
    label = task or DEFAULT_TASK
    stem = path.stem
    n0 = len(routing[0])
    if len(routing) > 1 and all(len(a) == n0 for a in routing[1:]) and n0 > 1:
        report.notes.append(f"every step has {n0} tokens: each step read as one request of prompt tokens")
        return [RequestRouting(f"{stem}:{s}", label, a, None, len(a)) for s, a in zip(order, routing)]
    if order[0] != 0:
        report.notes.append(f"first step is {order[0]}: read as the prefill")
    B = len(routing[1]) if len(routing) > 1 else 1
    bad = [s for s, a in zip(order[1:], routing[1:]) if len(a) != B]
    if bad:
        raise TraceError(f"{path}: decode step {bad[0]} has {len(routing[order.index(bad[0])])} tokens, earlier "
                         f"decode steps {B}; a run with a changing batch cannot be split into requests")
    if n0 % B:
        raise TraceError(f"{path}: the prefill's {n0} tokens do not split into the {B} requests the decode steps "
                         "show; import a run of one request per file")
    prefill = routing[0].reshape(n0 // B, B, L, k)          # sequence-major: token i -> request i mod B
    decode = np.stack(routing[1:], axis=0) if len(routing) > 1 else np.zeros((0, B, L, k), np.int64)
    if B > 1:
        report.notes.append(f"{B} requests per step: prefill split sequence-major")
    return [RequestRouting(stem if B == 1 else f"{stem}:{b}", label,
                           np.concatenate([prefill[:, b], decode[:, b]]), None, n0 // B) for b in range(B)]
