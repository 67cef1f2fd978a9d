"""Seconds an engine step takes, for admission estimates: the cost model's compute functions.

The eMoE scheduler (sim/schedulers/emoe.py) needs three quantities in seconds: one
decode step of a batch, the marginal time one more decoding request adds to a step,
and the marginal time a prompt's prefill chunks add to the steps they ride in. All
come from `CostModel.attention_s`, `experts_s` and `fixed_s` (roofline from the
hardware's datasheet figures, or a measured profile), arranged as `CostModel.step`
arranges them: fixed + L * attention + experts. Copies are left out: they depend on
the policy's cache, which the scheduler sees through the policy's dE and the
observed step times instead.

Which experts a future token picks is unknown, so n tokens are assumed to spread
their n * top_k routes uniformly: E * (1 - (1 - k/E)^n) distinct experts per layer
(interpolated between whole numbers), each with an equal share of the routes.

Without a cost model (a scheduler used on its own) the paper's linear model stands
in: every token processed costs `per_token_s`.
"""
from __future__ import annotations

import math

import numpy as np


class StepCosts:
    def __init__(self, cost=None, max_batch_tokens: int | None = None, per_token_s: float = 0.05):
        self.cost = cost
        self.max_tokens = int(max_batch_tokens) if max_batch_tokens else None
        self.per_token_s = float(per_token_s)
        self._ffn: dict[int, float] = {}
        if cost is not None:
            m = cost.m
            self.L, self.E, self.k = m.n_moe_layers, m.n_experts, m.top_k

    def compute_s(self, n_tokens: int, n_sampled: int, attn_ctx: float, kv_tokens: float, n_requests: int,
                  prefill_ctx: float = 0.0) -> float:
        """One step's compute: n_tokens processed, n_sampled of them sampled, attn_ctx the sum
        over tokens of the context each attends to (prefill_ctx of it by prompt-chunk tokens),
        kv_tokens KV entries read."""
        if n_tokens <= 0:
            return 0.0
        if self.cost is None:
            return self.per_token_s * n_tokens
        c = self.cost
        attn = c.attention_s(n_tokens, attn_ctx, kv_tokens, n_requests, prefill_ctx=prefill_ctx)
        return c.fixed_s(n_tokens, n_sampled) + self.L * attn + self.ffn_s(n_tokens)

    def ffn_s(self, n_tokens: int) -> float:
        """All MoE layers' expert time for n_tokens tokens routed uniformly (memoised by n)."""
        t = self._ffn.get(n_tokens)
        if t is None:
            distinct = self.E * (1.0 - (1.0 - self.k / self.E) ** n_tokens)
            lo, hi = max(math.floor(distinct), 1), max(math.ceil(distinct), 1)
            t_lo, t_hi = self._experts(n_tokens, lo), self._experts(n_tokens, hi)
            t = t_lo + (t_hi - t_lo) * (distinct - lo) if hi > lo else t_lo
            self._ffn[n_tokens] = t
        return t

    def _experts(self, n_tokens: int, active: int) -> float:
        counts = np.zeros((self.L, self.E))
        counts[:, :active] = n_tokens * self.k / active
        return float(self.cost.experts_s(counts, n_tokens).sum())

    def decode_step_s(self, n: int, ctx_sum: float) -> float:
        """One step of n requests decoding a token each; ctx_sum: their contexts summed."""
        return self.compute_s(n, n, ctx_sum + n, ctx_sum + n, n)

    def chunk_size(self, n_decode: int) -> int | None:
        """Prompt tokens one step can carry beside n_decode decode tokens (the engine's chunking)."""
        if self.max_tokens is None:
            return None
        return max(self.max_tokens - n_decode, 1)

    def prefill(self, prompt_left: int, prefilled: int, n_decode: int, ctx_sum: float) -> tuple[float, int]:
        """(seconds, steps) a prompt's remaining prefill adds, chunk by chunk, to steps that
        also carry n_decode decode tokens (contexts summed: ctx_sum). With nobody decoding, to a
        one-token step: the estimate counts every step a request lives through at least that
        (its last prefill step yields its first token), so the step's fixed cost is not charged twice."""
        if prompt_left <= 0:
            return 0.0, 0
        if self.cost is None:
            return self.per_token_s * prompt_left, 1
        size = self.chunk_size(n_decode) or prompt_left
        base = self.decode_step_s(max(n_decode, 1), ctx_sum)
        dec_ctx = ctx_sum + n_decode
        total, steps, p, left = 0.0, 0, prefilled, prompt_left
        while left > 0:
            c = min(size, left)
            last = c == left
            chunk_ctx = c * p + c * (c + 1) / 2
            with_chunk = self.compute_s(n_decode + c, n_decode + int(last), dec_ctx + chunk_ctx,
                                        dec_ctx + p + c, n_decode + 1, chunk_ctx)
            total += with_chunk - base
            steps += 1
            p += c
            left -= c
        return total, steps
