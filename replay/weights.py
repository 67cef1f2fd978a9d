"""Real Hugging Face weights for the replay model: check they are the scenario's model,
load them, and tokenize the trace's prompts with the checkpoint's own tokenizer.

Supported layouts (every layer an MoE layer, no shared experts):
- Mixtral (MixtralForCausalLM: block_sparse_moe.experts.J.w1/w3/w2), which the
  project's own small MoE (traces/models/emoe-small-moe) and Mixtral-8x7B/8x22B use;
- OLMoE (OlmoeForCausalLM: mlp.experts.J.gate/up/down_proj, QK-norm over the whole
  projection, top-k weights not renormalised);
- Qwen3-MoE (Qwen3MoeForCausalLM: the same expert names, QK-norm per head).
Qwen2-MoE and DeepSeek (shared experts, MLA) get a clear error naming what is supported.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from traces.errors import UserError

# architecture -> (expert prefix, gate name, w1/w3/w2 names, QK-norm: None | "full" | "head")
LAYOUTS = {
    "MixtralForCausalLM": ("block_sparse_moe", "gate", ("w1", "w3", "w2"), None),
    "OlmoeForCausalLM": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "full"),
    "Qwen3MoeForCausalLM": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "head"),
}
SUPPORTED = tuple(LAYOUTS)


class WeightsError(UserError):
    """The weights directory cannot be used for this scenario."""


def read_config(weights_dir) -> dict:
    d = Path(weights_dir)
    if not (d / "config.json").exists():
        raise WeightsError(f"'{d}' is not a Hugging Face checkpoint directory (no config.json); "
                           "--weights takes the directory `save_pretrained` wrote")
    cfg = json.loads((d / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise WeightsError(f"{d}: architecture {arch} is not supported by the replayer's weight loader "
                           f"(supported: {', '.join(SUPPORTED)}); replay it with random weights (no --weights)")
    if not list(d.glob("*.safetensors")):
        raise WeightsError(f"{d}: no *.safetensors files; save the checkpoint with safe_serialization=True")
    return cfg


def checkpoint_spec(cfg: dict, name: str = "checkpoint"):
    """The ModelSpec of a checkpoint's config.json (the capture code's reading of it)."""
    from types import SimpleNamespace
    from traces.capture import spec_from_config
    return spec_from_config(SimpleNamespace(**cfg), name)


def check_spec(spec, cfg: dict, weights_dir) -> None:
    """The scenario's model must be the checkpoint's: same shape, field by field."""
    ck = checkpoint_spec(cfg)
    if ck.n_shared_experts or ck.n_moe_layers != ck.n_layers or cfg.get("mlp_only_layers"):
        raise WeightsError(f"{weights_dir}: shared experts or dense layers are not supported by the replayer's "
                           "weight loader; replay it with random weights (no --weights)")
    fields = ("hidden", "expert_ffn", "n_moe_layers", "n_experts", "top_k", "n_heads", "n_kv_heads", "vocab", "hd")
    want = {k: getattr(ck, k) for k in fields}
    bad = [f"{k}: scenario {getattr(spec, k)}, checkpoint {v}" for k, v in want.items() if getattr(spec, k) != v]
    if bad:
        raise WeightsError(f"the scenario's model '{spec.name}' is not the checkpoint in {weights_dir} ("
                           + "; ".join(bad) + "); set the scenario's model to the checkpoint's dimensions "
                           "(and do not use --scale)")


def rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise WeightsError(f"rope_type {rp['rope_type']!r} is not supported (only the default rotary embedding)")
    return float(rp.get("rope_theta") or cfg.get("rope_theta") or 1e6)


def load_into(rt, weights_dir, cfg: dict) -> None:
    """Copy the checkpoint's tensors into a ReplayModel built at the same shape."""
    from safetensors import safe_open
    s = rt.spec
    # Read tensor by tensor from the memory-mapped shards: a real checkpoint is as large as
    # the host experts it fills, so it is never held in memory twice.
    where = {}
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        sf = safe_open(str(f), framework="pt")
        for k in sf.keys():
            where[k] = sf

    def get(name):
        if name not in where:
            raise WeightsError(f"{weights_dir}: tensor '{name}' missing; is this a complete "
                               f"{cfg['architectures'][0]} checkpoint?")
        return where[name].get_tensor(name).to(rt.dtype)

    def put(dst, src):
        if tuple(dst.shape) != tuple(src.shape):
            raise WeightsError(f"{weights_dir}: tensor of shape {tuple(src.shape)} where the model needs "
                               f"{tuple(dst.shape)}")
        dst.copy_(src)

    moe, gate, (n1, n3, n2), qk = LAYOUTS[cfg["architectures"][0]]
    put(rt.embed, get("model.embed_tokens.weight"))
    head = "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"
    put(rt.head, get(head))
    put(rt.norm, get("model.norm.weight"))
    rt.qk_norm = qk
    rt.norm_topk = bool(cfg.get("norm_topk_prob", True)) if qk else True   # Mixtral always renormalises
    for li, layer in enumerate(rt.layers):
        p = f"model.layers.{li}."
        put(layer["wq"], get(p + "self_attn.q_proj.weight").T)
        put(layer["wk"], get(p + "self_attn.k_proj.weight").T)
        put(layer["wv"], get(p + "self_attn.v_proj.weight").T)
        put(layer["wo"], get(p + "self_attn.o_proj.weight").T)
        put(layer["n1"], get(p + "input_layernorm.weight"))
        put(layer["n2"], get(p + "post_attention_layernorm.weight"))
        if qk:
            layer["qn"] = get(p + "self_attn.q_norm.weight").to(rt.device)
            layer["kn"] = get(p + "self_attn.k_norm.weight").to(rt.device)
            rt.dense_bytes += (layer["qn"].numel() + layer["kn"].numel()) * layer["qn"].element_size()
        put(layer["router"], get(p + f"{moe}.{gate}.weight").T)
        for e in range(s.n_experts):
            q = p + f"{moe}.experts.{e}."
            flat = torch.cat([get(q + f"{n1}.weight").T.reshape(-1), get(q + f"{n3}.weight").T.reshape(-1),
                              get(q + f"{n2}.weight").T.reshape(-1)])
            put(rt.host_experts[li][e], flat)
    # Experts already in the device cache were copied from the random host tensors: refresh.
    for (li, e), slot in rt.cache.slot_of.items():
        rt.cache.pool[slot].copy_(rt.host_experts[li][e])


def prompt_ids(weights_dir, trace, indices) -> dict:
    """Token ids of the trace's prompts (request index -> array), with the checkpoint's tokenizer.
    Each must have the trace's prompt length, or the trace was not captured with this model."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise WeightsError("--weights needs transformers for the tokenizer: pip install -e '.[capture]'") from None
    if trace.prompt_text is None:
        raise WeightsError("--weights replays real text, but the trace has no prompt_text; use a trace from "
                           "`emoe capture` (or replay without --weights: routing from the trace)")
    tok = AutoTokenizer.from_pretrained(str(weights_dir))
    out = {}
    for i in indices:
        text = str(trace.prompt_text[i])
        if not text:
            with_text = sorted({str(t) for t, p in zip(trace.task, trace.prompt_text) if str(p)})
            which = ("tasks with text: " + ", ".join(with_text) if with_text
                     else "no selected task has prompt text")
            raise WeightsError(f"request {trace.request_id[i]} ({trace.task[i]}) has no prompt text in the "
                               "trace (licence-restricted prompts are not shipped); select requests that have "
                               f"it with workload.tasks ({which})")
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
        if len(ids) != trace.prompt_tokens[i]:
            raise WeightsError(f"request {trace.request_id[i]}: the tokenizer in {weights_dir} gives "
                               f"{len(ids)} prompt tokens, the trace {trace.prompt_tokens[i]}; the trace was "
                               "not captured with this model")
        out[i] = ids
    return out
