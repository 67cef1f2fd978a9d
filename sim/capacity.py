"""How large a batch and how long a prompt fit in GPU memory under a policy.

What a policy saves in expert memory becomes KV cache: the paper's "prompts 40x
longer, batches 4.5x larger with 60% of experts". Fixed parts as in MemoryLedger
(dense weights, the policy's expert cache and staging buffer, predictor); the
rest holds the KV cache and the activations of one step:
- longest prompt: one request whose prompt is prefilled in chunks of
  limits.max_batch_tokens;
- largest batch: B requests of seq_len tokens each decoding together.
"""
from __future__ import annotations

from sim.memory import MemoryLedger


def capacity(model, hw, policy, limits: dict, seq_len: int = 512) -> dict:
    util = float(limits["memory_utilization"])
    chunk = int(limits["max_batch_tokens"])
    led = MemoryLedger(model, hw, policy, 1, util)          # raises if the fixed parts do not fit
    free = led.budget - led.dense - led.expert_reserve - led.predictor
    kv, act, logits = led.kv_per_token, led.act_per_token, led.logit_bytes

    # Longest prompt: P * kv + act(min(P, chunk)) + logits <= free.
    p_long = int((free - logits - min(chunk, max(free // kv, 0)) * act) // kv)
    if p_long < chunk:   # short enough that the whole prompt is one chunk
        p_long = int((free - logits) // (kv + act))
    # Largest batch: B * (seq_len * kv + act + logits) <= free.
    b_max = int(free // (seq_len * kv + act + logits))
    return dict(policy=policy.name, budget_bytes=led.budget, dense_bytes=led.dense,
                expert_bytes=led.expert_reserve, predictor_bytes=led.predictor, free_bytes=free,
                experts_resident=policy.cache_experts, experts_total=model.total_experts,
                longest_prompt_tokens=max(p_long, 0), largest_batch=max(b_max, 0), seq_len=seq_len,
                memory_at_seq_len_bytes=led.dense + led.expert_reserve + led.predictor + seq_len * kv
                + min(seq_len, chunk) * act + logits)
