"""Routing that vLLM returns with `--enable-return-routed-experts`, saved as JSONL.

One JSON object per line, any of:
- an OpenAI-API response: {"id", "prompt_routed_experts": [prompt_len][layers][top_k],
  "choices": [{"index", "text" | "message", "routed_experts": [gen_len][layers][top_k]}]};
- an offline `LLM.generate` output: {"request_id", "prompt", "prompt_routed_experts",
  "outputs": [{"index", "text", "routed_experts"}], "metrics": {"arrival_time"}};
- a flat record: {"request_id" | "id", "prompt_routed_experts", "routed_experts"}.
Each completion becomes one request (id "<id>:<index>" when a prompt has several),
its prompt routing shared. vLLM returns expert ids only, so gates are absent. Taken
from the same record where present: the task ("task", "dataset" or metadata.task;
else --task), the prompt text ("prompt", or the chat "messages"), the arrival time
("arrival_s", metrics.arrival_time or "created"; made relative to the first).
An expert id of -1 (a missing route) is an error, or filled with --repair.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.format import TraceError
from traces.importer import DEFAULT_TASK, ImportReport, RequestRouting, check_expert_ids, read_jsonl


def _routing(value, what: str, where: str, model) -> np.ndarray:
    """A [tokens][layers][top_k] list as an int array, checked against the model."""
    if isinstance(value, str):
        raise TraceError(f"{where}: '{what}' is a string (base64, as some engines encode it); "
                         "save it as a nested list of expert ids")
    try:
        a = np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError):
        raise TraceError(f"{where}: '{what}' must be a [tokens][layers][top_k] list of expert ids") from None
    if a.size == 0:
        return np.zeros((0, model.n_moe_layers, model.top_k), dtype=np.int64)
    if a.ndim != 3 or a.shape[1:] != (model.n_moe_layers, model.top_k):
        raise TraceError(f"{where}: '{what}' has shape {list(a.shape)}, expected [tokens, {model.n_moe_layers}, "
                         f"{model.top_k}] for model '{model.name}' (layers, top_k)")
    return a


def _task(rec: dict):
    meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    return rec.get("task", rec.get("dataset", meta.get("task")))


def _arrival(rec: dict):
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    for v in (rec.get("arrival_s"), metrics.get("arrival_time"), rec.get("arrival_time"), rec.get("created")):
        if isinstance(v, (int, float)):
            return float(v)
    return float("nan")


def _prompt_text(rec: dict):
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    return None


def read_vllm(path: Path, model, report: ImportReport, task: str | None, progress=None) -> list[RequestRouting]:
    out, seen = [], {}
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        rid = rec.get("request_id", rec.get("id"))
        if rid is None:
            raise TraceError(f"{where}: missing 'request_id' (or 'id')")
        completions = rec.get("choices") if "choices" in rec else rec.get("outputs")
        if completions is None:
            completions = [dict(index=0, routed_experts=rec.get("routed_experts", []))]
        if not isinstance(completions, list) or not completions:
            raise TraceError(f"{where}: no completions ('choices' or 'outputs') in this record")
        if "prompt_routed_experts" not in rec:
            raise TraceError(f"{where}: missing 'prompt_routed_experts' (was vLLM started with "
                             "--enable-return-routed-experts?)")
        prompt = _routing(rec["prompt_routed_experts"], "prompt_routed_experts", where, model)
        check_expert_ids(prompt, model, where, allow_missing=report.repair)
        label = _task(rec) or task or DEFAULT_TASK
        for c in completions:
            if not isinstance(c, dict) or "routed_experts" not in c:
                raise TraceError(f"{where}: a completion lacks 'routed_experts'")
            gen = _routing(c["routed_experts"], "routed_experts", where, model)
            check_expert_ids(gen, model, where, allow_missing=report.repair)
            name = str(rid) if len(completions) == 1 else f"{rid}:{c.get('index', len(out))}"
            if name in seen:
                raise TraceError(f"{where}: request '{name}' given twice (first on line {seen[name]}); "
                                 "request ids must be unique")
            seen[name] = lineno
            out.append(RequestRouting(name, str(label), np.concatenate([prompt, gen]), None, len(prompt),
                                      _arrival(rec), _prompt_text(rec)))
    arrivals = np.array([r.arrival_s for r in out])
    if np.isfinite(arrivals).any():
        origin = float(np.nanmin(arrivals))
        for r in out:
            r.arrival_s -= origin
        report.notes.append(f"arrival times relative to the first ({origin:.3f})")
    report.notes.append("vLLM returns expert ids only: gates are absent (uniform placeholders, left out of "
                        "statistics)")
    return out
