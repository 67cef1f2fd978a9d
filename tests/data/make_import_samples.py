"""Write the importer's sample files (tests/data/import/) from a small synthetic trace.

    python tests/data/make_import_samples.py [OUT_DIR]

Each format as the engines write it, plus the damaged dumps real profilers produce:
rows dropped for router ties with per-layer renumbered token indices, decode-step
records whose position is always 0, and one problem id in two datasets. The writers
are deterministic: tests/test_import_formats.py checks the shipped files are what
this script writes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "import"


def sample_trace():
    """Four requests of the `tiny` shape (4 layers, 8 experts, top-2) with routing drawn here,
    not by the generator, so the samples stay fixed when the generator changes. A token
    mostly keeps its two experts across layers (what lets a repair realign dropped rows)."""
    from traces.format import Trace
    rng = np.random.default_rng(12)
    L, E, k = 4, 8, 2
    prompt, output = np.array([12, 6, 3, 4]), np.array([6, 11, 9, 13])
    T = int((prompt + output).sum())
    experts = np.empty((T, L, k), dtype=np.uint8)
    for t in range(T):
        pair = rng.choice(E, k, replace=False)
        for layer in range(L):
            if layer and rng.random() < 0.25:
                pair = rng.choice(E, k, replace=False)
            experts[t, layer] = pair
    top = rng.uniform(0.5, 0.95, size=(T, L))
    gates = np.stack([top, 1 - top], axis=2).astype(np.float16)
    return Trace(model="tiny", n_layers=L, n_experts=E, top_k=k, request_id=[f"r{i:06d}" for i in range(4)],
                 task=["code", "math", "code", "math"], prompt_tokens=prompt, output_tokens=output, experts=experts,
                 gates=gates)


def _dump(path: Path, records):
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def _g(x) -> list:
    return [round(float(v), 4) for v in x]


def rows_records(t, position_key="token_idx"):
    """One record per (request, layer, token), token-major as a profiler hook writes them."""
    out = []
    for r in range(t.n_requests):
        sl = t.token_slice(r)
        for i, (ex, g) in enumerate(zip(t.experts[sl], t.gates[sl])):
            for layer in range(t.n_layers):
                out.append({"dataset": str(t.task[r]), "problem_id": str(t.request_id[r]), "layer": layer,
                            position_key: i, "experts": [int(e) for e in ex[layer]], "gating_probs": _g(g[layer]),
                            "is_prompt": bool(i < t.prompt_tokens[r])})
    return out


def tie_dropped(records, rate=0.04, seed=0):
    """Drop rows at random (ties), then renumber token indices within each (request, layer)."""
    rng = np.random.default_rng(seed)
    kept = [r for r in records if r["token_idx"] > 0 and rng.random() >= rate or r["token_idx"] == 0]
    count: dict = {}
    out = []
    for r in kept:
        key = (r["problem_id"], r["layer"])
        r = dict(r, token_idx=count.get(key, 0))
        count[key] = r["token_idx"] + 1
        out.append(r)
    return out


def constant_position(t):
    """Prompt rows keep their positions; every decode step is keyed token_pos 0 (write order)."""
    out = []
    for rec in rows_records(t, "token_pos"):
        if not rec["is_prompt"]:
            rec = dict(rec, token_pos=0)
        out.append(rec)
    return out


def repeated_id(t):
    """The first request of each task renamed to problem id "0" (as two datasets number their problems)."""
    firsts = {str(t.request_id[np.flatnonzero(t.task == task)[0]]) for task in t.tasks}
    return [dict(r, problem_id="0") if r["problem_id"] in firsts else r for r in rows_records(t)]


def vllm_responses(t):
    """OpenAI-API responses: requests 0 and 1 as two completions (n=2) of one prompt,
    the others one completion each; task in metadata, arrival as 'created'."""
    def ids(a):
        return a.astype(int).tolist()
    out = []
    r0 = t.token_slice(0)
    p = int(t.prompt_tokens[0])
    gen1 = t.experts[t.token_slice(1)][int(t.prompt_tokens[1]):]
    out.append({"id": "cmpl-0", "object": "text_completion", "created": 1700000000,
                "metadata": {"task": str(t.task[0])},
                "prompt_routed_experts": ids(t.experts[r0][:p]),
                "choices": [{"index": 0, "text": "...", "routed_experts": ids(t.experts[r0][p:])},
                            {"index": 1, "text": "...", "routed_experts": ids(gen1)}]})
    for r in range(2, t.n_requests):
        sl, p = t.token_slice(r), int(t.prompt_tokens[r])
        out.append({"id": f"cmpl-{r}", "object": "text_completion", "created": 1700000000 + r,
                    "metadata": {"task": str(t.task[r])}, "prompt_routed_experts": ids(t.experts[sl][:p]),
                    "choices": [{"index": 0, "text": "...", "routed_experts": ids(t.experts[sl][p:])}]})
    return out


def vllm_offline(t, missing=False):
    """Offline LLM.generate outputs; with missing=True one route is vLLM's -1 sentinel."""
    out = []
    for r in range(t.n_requests):
        sl, p = t.token_slice(r), int(t.prompt_tokens[r])
        gen = t.experts[sl][p:].astype(int)
        if missing and r == 1:
            gen[2, 1] = -1
        out.append({"request_id": str(t.request_id[r]), "prompt": f"prompt {r}", "task": str(t.task[r]),
                    "metrics": {"arrival_time": 50.0 + 0.5 * r},
                    "prompt_routed_experts": t.experts[sl][:p].astype(int).tolist(),
                    "outputs": [{"index": 0, "text": "...", "routed_experts": gen.tolist()}]})
    return out


def megatron_run(t, requests=(0, 1)):
    """One static-batched inference run of two requests with equal prompts: the prefill
    sequence-major, then one decode token per request per step; plus an MTP record."""
    rs = list(requests)
    P = int(min(t.prompt_tokens[r] for r in rs))
    G = int(min(t.output_tokens[r] for r in rs))
    seqs = [t.experts[t.token_slice(r)] for r in rs]
    out = []
    pre = np.stack([s[:P] for s in seqs], axis=1).reshape(P * len(rs), t.n_layers, t.top_k)   # [s, b] -> s-major
    for step in range(G + 1):
        rows = pre if step == 0 else np.stack([s[t.prompt_tokens[r] + step - 1] for s, r in zip(seqs, rs)])
        for layer in range(t.n_layers):
            out.append({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                        "num_tokens": len(rows), "topk": t.top_k, "top_indices": rows[:, layer].astype(int).tolist()})
        if step == 0:
            out.append({"step": 0, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "mtp_idx": 0, "rank": 0,
                        "num_tokens": len(rows), "topk": t.top_k, "top_indices": rows[:, 0].astype(int).tolist()})
    return out


def write_all(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    t = sample_trace()
    files = {
        "rows.jsonl": rows_records(t),
        "rows-tie-dropped.jsonl": tie_dropped(rows_records(t)),
        "rows-constant-position.jsonl": constant_position(t),
        "rows-repeated-id.jsonl": repeated_id(t),
        "vllm-responses.jsonl": vllm_responses(t),
        "vllm-offline.jsonl": vllm_offline(t),
        "vllm-offline-missing-route.jsonl": vllm_offline(t, missing=True),
        "megatron-router-trace.jsonl": megatron_run(t),
    }
    for name, records in files.items():
        _dump(out / name, records)
    return [out / n for n in files]


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(f"wrote {p} ({p.stat().st_size} bytes)")
