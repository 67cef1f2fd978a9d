"""Capture routing traces from Hugging Face MoE checkpoints (needs torch and transformers).

Prompts are generated greedily in batches; then one teacher-forced forward pass
over prompt + generated tokens, with `output_router_logits=True`, gives the
router logits of every token at every MoE layer (a causal model routes token t
from tokens <= t only, so this equals the routing seen while decoding). Each
architecture's own selection rule turns logits into the top-k experts and gate
weights:

- Mixtral: softmax, top-k, renormalised;
- OLMoE, Qwen2-MoE, Qwen3-MoE: softmax, top-k, renormalised if `norm_topk_prob`;
- DeepSeek-V3: sigmoid scores (+ `e_score_correction_bias` for the choice),
  group-limited top-k, weights renormalised if `norm_topk_prob`.

The full router softmax is stored as `router_probs`.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from traces.format import Trace, expert_dtype
from traces.model_shape import ModelSpec

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def read_prompts(path) -> list[dict]:
    """JSONL of {"task": ..., "prompt": ...} (an optional "reference" continuation is kept)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompts file '{p}' does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("task"), str) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{p}:{n}: each line needs string fields 'task' and 'prompt'")
        out.append(row)
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


def moe_shape(config) -> tuple[int, int, str]:
    """(n_experts, top_k, model_type) of a Hugging Face MoE config."""
    mt = config.model_type
    if mt not in SUPPORTED:
        raise ValueError(f"model type '{mt}' is not supported for capture; supported: {', '.join(SUPPORTED)}")
    E = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) \
        or getattr(config, "n_routed_experts", None)
    return int(E), int(config.num_experts_per_tok), mt


def spec_from_config(config, name: str) -> ModelSpec:
    """The simulator's ModelSpec of a Hugging Face MoE config."""
    E, k, mt = moe_shape(config)
    n_layers = config.num_hidden_layers
    dense_first = getattr(config, "first_k_dense_replace", 0) or 0
    step = getattr(config, "decoder_sparse_step", 1) or 1
    moe_layers = len([i for i in range(n_layers) if i >= dense_first and (i + 1) % step == 0])
    ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = getattr(config, "n_shared_experts", 0) or (1 if getattr(config, "shared_expert_intermediate_size", 0)
                                                       else 0)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dbytes = 2 if ("16" in dtype) else 4
    return ModelSpec(name=name, hidden=config.hidden_size, expert_ffn=ffn, n_layers=n_layers, n_moe_layers=moe_layers,
                     n_experts=E, top_k=k, n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                     vocab=config.vocab_size, dtype_bytes=dbytes, head_dim=getattr(config, "head_dim", 0) or 0,
                     n_shared_experts=shared,
                     shared_ffn=getattr(config, "shared_expert_intermediate_size", 0) or 0,
                     dense_ffn=config.intermediate_size if dense_first else 0,
                     tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                     source=f"Hugging Face config ({mt})")


def select(logits, config, layer_module=None):
    """(tokens, E) router logits -> (experts (tokens, k), gates (tokens, k), probs (tokens, E))."""
    import torch
    E, k, mt = moe_shape(config)
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    norm = getattr(config, "norm_topk_prob", mt == "mixtral")
    if mt == "mixtral":
        norm = True
    if mt == "deepseek_v3":
        scores = torch.sigmoid(logits)
        choice = scores.clone()
        bias = getattr(getattr(layer_module, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            choice = choice + bias.float()
        G, kg = config.n_group, config.topk_group
        if G > 1:
            grouped = choice.view(-1, G, E // G)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(kg, dim=-1).indices, 1.0)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
        idx = choice.topk(k, dim=-1).indices
        w = scores.gather(1, idx)
    else:
        w, idx = probs.topk(k, dim=-1)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    # Rank order: descending weight.
    order = w.argsort(dim=-1, descending=True)
    return idx.gather(1, order), w.gather(1, order), probs


def moe_modules(model) -> list:
    """The decoder layers that have a router, in order (for DeepSeek's bias)."""
    layers = model.model.layers
    return [layer.mlp for layer in layers if hasattr(layer.mlp, "gate")]


def capture(model, tokenizer, prompts: list[dict], max_new_tokens: int = 32, batch_size: int = 8,
            device: str = "cpu", name: str | None = None, progress=None) -> Trace:
    import torch
    config = model.config
    E, k, mt = moe_shape(config)
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    modules = moe_modules(model)
    experts, gates, probs_all, n_prompt, n_out = [], [], [], [], []
    for b0 in range(0, len(prompts), batch_size):
        batch = prompts[b0:b0 + batch_size]
        enc = tokenizer([p["prompt"] for p in batch], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        P = enc["input_ids"].shape[1]
        for i in range(len(batch)):
            prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
            new = gen[i, P:]
            eos = tokenizer.eos_token_id
            if eos is not None and (new == eos).any():
                new = new[: int((new == eos).nonzero()[0]) + 1]     # keep the EOS token, drop padding after it
            seq = torch.cat([prompt_ids, new]).unsqueeze(0)
            with torch.no_grad():
                out = model(seq, output_router_logits=True)
            per_layer = [select(rl[-seq.shape[1]:], config, mod) for rl, mod in zip(out.router_logits, modules)]
            experts.append(torch.stack([e for e, _, _ in per_layer], dim=1).cpu().numpy())
            gates.append(torch.stack([g for _, g, _ in per_layer], dim=1).cpu().numpy())
            probs_all.append(torch.stack([p for _, _, p in per_layer], dim=1).cpu().numpy())
            n_prompt.append(len(prompt_ids))
            n_out.append(len(new))
        if progress:
            progress(len(batch))
    L = experts[0].shape[1]
    name = name or getattr(config, "_name_or_path", "") or mt
    model_name = Path(str(name)).name or mt
    return Trace(model=model_name, n_layers=L, n_experts=E, top_k=k,
                 request_id=[f"p{i:05d}" for i in range(len(prompts))], task=[p["task"] for p in prompts],
                 prompt_tokens=n_prompt, output_tokens=n_out, experts=np.concatenate(experts).astype(expert_dtype(E)),
                 gates=np.concatenate(gates).astype(np.float16),
                 prompt_text=np.array([p["prompt"] for p in prompts]),
                 router_probs=np.concatenate(probs_all).astype(np.float16),
                 n_shared_experts=getattr(config, "n_shared_experts", 0) or 0,
                 extra=dict(captured_from=str(name), model_type=mt, max_new_tokens=max_new_tokens),
                 model_shape=model_shape(config, model_name))


def model_shape(config, name: str) -> dict:
    """The checkpoint's whole shape as the trace records it (`model: from_trace` runs it)."""
    return asdict(spec_from_config(config, name))


def capture_dir(model_dir, prompts_path, max_new_tokens: int, device: str, batch_size: int, progress=None) -> Trace:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"'{d}' is not a Hugging Face checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    return capture(model, tok, read_prompts(prompts_path), max_new_tokens, batch_size, device, d.name, progress)
