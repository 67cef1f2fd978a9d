"""GPU memory: what is reserved, what may be admitted, and a timeline by part.

Parts: dense weights (always resident), experts (the policy's cache, plus a
staging buffer of top_k experts where the cache can be full), KV cache (grows
per token), activations (reserved for the largest step), predictor (if the
policy has one). The KV cache gets whatever the rest leaves of the budget.
"""
from __future__ import annotations

import numpy as np


class MemoryBudgetError(ValueError):
    """The fixed parts alone do not fit the GPU memory."""


def activation_bytes_per_token(model) -> float:
    """Working set of one token through one layer: hidden states, q/k/v, and the
    intermediate of its top_k experts (the largest live tensors), in dtype."""
    kv_dim = 2 * model.n_kv_heads * model.hd
    return (4 * model.hidden + kv_dim + 2 * model.top_k * model.expert_ffn) * model.dtype_bytes


class MemoryLedger:
    PARTS = ("dense", "experts", "kv", "activations", "predictor")

    def __init__(self, model, hw, policy, max_batch_tokens: int, utilization: float):
        self.model = model
        self.budget = hw.total_memory * utilization
        self.bpe = model.bytes_per_expert
        self.dense = model.dense_bytes
        self.staging = model.top_k * self.bpe if policy.cache_experts < model.total_experts else 0
        self.expert_reserve = policy.cache_experts * self.bpe + self.staging
        self.predictor = policy.predictor_bytes
        self.act_per_token = activation_bytes_per_token(model)
        self.logit_bytes = model.vocab * 4
        self.act_reserve = max_batch_tokens * self.act_per_token
        self.kv_per_token = model.kv_bytes_per_token
        self.kv_budget = self.budget - self.dense - self.expert_reserve - self.predictor - self.act_reserve
        if self.kv_budget < self.kv_per_token * 16:
            fixed = self.dense + self.expert_reserve + self.predictor + self.act_reserve
            raise MemoryBudgetError(
                f"impossible memory budget: dense weights {self.dense / 1e9:.1f} GB + expert cache "
                f"{self.expert_reserve / 1e9:.1f} GB + activations {self.act_reserve / 1e9:.1f} GB"
                + (f" + predictor {self.predictor / 1e9:.2f} GB" if self.predictor else "")
                + f" = {fixed / 1e9:.1f} GB leave no room for a KV cache in {self.budget / 1e9:.1f} GB "
                f"({hw.count} x {hw.name} at {utilization:.0%}); lower policy.capacity, "
                f"limits.max_batch_tokens, or add GPUs (hardware.count)")
        self.kv_used = 0.0
        self.peak = dict.fromkeys(self.PARTS, 0.0)
        self.peak_total = 0.0

    def kv_fits(self, tokens: int) -> bool:
        return self.kv_used + tokens * self.kv_per_token <= self.kv_budget

    def sample(self, resident_experts: int, staged: int, n_tokens: int, n_sampled: int) -> dict:
        """The memory of one step, by part; updates the peaks."""
        parts = dict(dense=float(self.dense),
                     experts=float((resident_experts + min(staged, self.model.top_k)) * self.bpe),
                     kv=float(self.kv_used),
                     activations=float(n_tokens * self.act_per_token + n_sampled * self.logit_bytes),
                     predictor=float(self.predictor))
        total = sum(parts.values())
        for k, v in parts.items():
            if v > self.peak[k]:
                self.peak[k] = v
        if total > self.peak_total:
            self.peak_total = total
        return parts


def largest_fitting(limit_bytes: float, per_unit: float) -> int:
    return int(np.floor(limit_bytes / per_unit)) if per_unit > 0 else 0
