"""GPU memory: what is reserved, what may be admitted, and a timeline by part.

Parts: dense weights (always resident), experts (the policy's cache, plus a
staging buffer of top_k experts where the cache can be full), KV cache (grows
per token), activations (reserved for the largest step), predictor (if the
policy has one). The KV cache gets whatever the rest leaves of the budget.
"""
from __future__ import annotations

import numpy as np

from traces.errors import UserError


class MemoryBudgetError(UserError):
    """The fixed parts alone do not fit the GPU memory."""


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


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
        # The staging buffer (top_k expert slots, where the cache can be full) is allocated with the
        # cache, so every step counts it, streaming or not: a policy that never streams (rerouting)
        # holds it all the same (a cold eMoE fetches), and replay allocates it up front.
        self.staging_slots = model.top_k if policy.cache_experts < model.total_experts else 0
        self.staging = self.staging_slots * self.bpe
        self.expert_reserve = policy.cache_experts * self.bpe + self.staging
        self.predictor = policy.predictor_bytes
        self.act_per_token = activation_bytes_per_token(model)
        self.logit_bytes = model.vocab * 4
        self.act_reserve = max_batch_tokens * self.act_per_token
        self.kv_per_token = model.kv_bytes_per_token
        # KV held in blocks of this many tokens per request (a measured profile of the replay says
        # how the replay holds it; 1: per token, the datasheet presets). Admission stays per token.
        self.kv_block = int((hw.measured or {}).get("kv_block_tokens", 1))
        self.kv_budget = self.budget - self.dense - self.expert_reserve - self.predictor - self.act_reserve
        if self.kv_budget < self.kv_per_token * 16:
            fixed = self.dense + self.expert_reserve + self.predictor + self.act_reserve
            raise MemoryBudgetError(
                f"impossible memory budget: dense weights {fmt_bytes(self.dense)} + expert cache "
                f"{fmt_bytes(self.expert_reserve)} + activations {fmt_bytes(self.act_reserve)}"
                + (f" + predictor {fmt_bytes(self.predictor)}" if self.predictor else "")
                + f" = {fmt_bytes(fixed)} leave no room for a KV cache in {fmt_bytes(self.budget)} "
                f"({hw.count} x {hw.name} at {utilization:.0%}); lower policy.capacity, "
                f"limits.max_batch_tokens, or add GPUs (hardware.count)")
        self.kv_used = 0.0
        self.peak = dict.fromkeys(self.PARTS, 0.0)
        self.peak_total = 0.0

    def kv_fits(self, tokens: int) -> bool:
        return self.kv_used + tokens * self.kv_per_token <= self.kv_budget

    def kv_held(self, tokens):
        """Bytes of KV a request holding `tokens` tokens occupies (whole blocks; an array works too)."""
        b = self.kv_block
        return (-(-tokens // b) * b) * self.kv_per_token

    def sample(self, resident_experts: int, n_tokens: int, n_sampled: int, kv: float | None = None) -> dict:
        """The memory of one step, by part; updates the peaks. Experts: the cache's occupied slots
        plus the staging buffer. kv: the KV held, if not kv_used (KV in blocks: Engine.kv_held_bytes)."""
        parts = dict(dense=float(self.dense),
                     experts=float((resident_experts + self.staging_slots) * self.bpe),
                     kv=float(self.kv_used if kv is None else kv),
                     activations=float(n_tokens * self.act_per_token + n_sampled * self.logit_bytes),
                     predictor=float(self.predictor))
        total = sum(parts.values())
        for k, v in parts.items():
            if v > self.peak[k]:
                self.peak[k] = v
        if total > self.peak_total:
            self.peak_total = total
        return parts

    def sample_run(self, resident_experts: np.ndarray, kv_used: np.ndarray, n_tokens, n_sampled: int) -> dict:
        """sample() for many steps at once (one element per step, as lists: timeline columns);
        updates the peaks. Dense weights and the predictor are the same in every step, and the
        activations too unless n_tokens is given per step (a run whose first step prefills)."""
        n = len(kv_used)
        dense, predictor = float(self.dense), float(self.predictor)
        if np.ndim(n_tokens):
            act = (n_tokens * self.act_per_token + n_sampled * self.logit_bytes).astype(float)
            activations, act_peak, act_column = act, float(act.max()), act.tolist()
        else:
            activations = act_peak = float(n_tokens * self.act_per_token + n_sampled * self.logit_bytes)
            act_column = [activations] * n
        experts = ((resident_experts + self.staging_slots) * self.bpe).astype(float)
        kv = np.asarray(kv_used, dtype=float)
        total = dense + experts + kv + activations + predictor       # sample()'s order of terms
        for k, v in (("dense", dense), ("experts", float(experts.max())), ("kv", float(kv.max())),
                     ("activations", act_peak), ("predictor", predictor)):
            if v > self.peak[k]:
                self.peak[k] = v
        self.peak_total = max(self.peak_total, float(total.max()))
        return dict(dense=[dense] * n, experts=experts.tolist(), kv=kv.tolist(),
                    activations=act_column, predictor=[predictor] * n)
