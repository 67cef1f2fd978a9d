"""How long an engine step takes: roofline compute per layer, expert copies over one
host-to-device link, and their overlap.

Compute (per transformer layer, roofline: max(flops / rate, bytes / bandwidth)):
- attention: projections over the step's tokens, plus QK^T and AV over each
  token's context; reads the projection weights and every request's KV cache;
- experts: each expert with t > 0 tokens reads its weights once and does
  2 * t * params flops; a shared expert / dense FFN serves every token;
- the LM head for each request that samples a token, and fixed overheads.

Copies: one link, one expert at a time (latency + bytes / bandwidth). Within a
step, layer l's router runs after its attention; demand loads for l start then,
behind the copy in flight but ahead of queued prefetches; layer l's experts
compute once its loads (demand and prefetched) have arrived. Prefetches are
issued `lead` layers early (or at step start for later steps) and run whenever
the link is free. The link's backlog carries over to the next step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class StepTiming:
    duration_s: float
    link_busy_s: float       # copy time started during this step
    stall_s: float           # time layers waited for experts


def measured_for(hw, model) -> dict | None:
    """The profile's measured cost functions, if they were measured on this model shape."""
    m = hw.measured
    if not m:
        return None
    shape = m.get("model", {})
    keys = ("hidden", "expert_ffn", "n_moe_layers", "n_experts", "top_k", "n_heads", "n_kv_heads")
    if any(shape.get(k) != getattr(model, k) for k in keys):
        return None
    if shape.get("n_shared_experts", 0) != model.n_shared_experts:   # older profiles lack the key
        return None
    return m


class CostModel:
    def __init__(self, model, hw):
        self.m, self.hw = model, hw
        d = model.dtype_bytes
        self.flops, self.bw = hw.flops, hw.hbm
        self.attn_bytes = model.attention_params_per_layer * d
        self.kv_layer_bytes = model.kv_bytes_per_token / model.n_layers
        self.expert_bytes = model.bytes_per_expert
        self.expert_flops_per_token = 2 * model.expert_params
        shared_params = model.n_shared_experts * 3 * model.hidden * (model.shared_ffn or model.expert_ffn)
        self.shared_bytes = shared_params * d
        self.shared_flops_per_token = 2 * shared_params
        self.dense_layers = model.n_layers - model.n_moe_layers
        self.dense_ffn_params = 3 * model.hidden * model.dense_ffn
        self.head_params = model.vocab * model.hidden
        self.copy_s = hw.copy_time(model.bytes_per_expert)
        self.link_free_at = 0.0   # absolute time the link finishes its committed copies
        self.measured = measured_for(hw, model)

    # ---- compute ------------------------------------------------------------
    def attention_s(self, n_tokens: int, attn_ctx: float, kv_tokens: int, n_requests: int = 1,
                    maximum=max) -> float:
        """One layer's attention. attn_ctx: sum over tokens of the context each attends to;
        kv_tokens: KV entries read (all requests in the step). With maximum=np.maximum,
        attn_ctx and kv_tokens may be arrays (one per step)."""
        if self.measured:
            a = self.measured["attention_s"]
            return a["a"] + a["b"] * n_tokens + a["c"] * attn_ctx + a["d"] * n_requests
        m = self.m
        flops = 2 * n_tokens * m.attention_params_per_layer + 4 * attn_ctx * m.n_heads * m.hd
        nbytes = self.attn_bytes + kv_tokens * self.kv_layer_bytes
        return maximum(flops / self.flops, nbytes / self.bw) + self.hw.layer_overhead_s

    def experts_s(self, counts: np.ndarray, n_tokens: int) -> np.ndarray:
        """(L,) time of each MoE layer's expert FFNs (routed + shared); (T, L) for (T, L, E) counts."""
        active = counts > 0
        if self.measured:
            e = self.measured["expert_s"]
            per_layer = (active * e["a"] + counts * e["b"]).sum(axis=-1)
            sh = self.measured.get("shared_s")
            return per_layer + (sh["a"] + sh["b"] * n_tokens) if sh else per_layer
        t = np.maximum(counts * (self.expert_flops_per_token / self.flops), active * (self.expert_bytes / self.bw))
        per_layer = t.sum(axis=-1)
        if self.shared_bytes:
            per_layer = per_layer + max(n_tokens * self.shared_flops_per_token / self.flops,
                                        self.shared_bytes / self.bw)
        return per_layer

    def fixed_s(self, n_tokens: int, n_sampled: int) -> float:
        """Dense (non-MoE) layers' FFNs, the LM head, and the step overhead."""
        if self.measured:
            st = self.measured["step_s"]
            return st["a"] + st["b"] * n_sampled + st["c"] * n_tokens
        d = self.m.dtype_bytes
        dense = self.dense_layers * max(2 * n_tokens * self.dense_ffn_params / self.flops,
                                        self.dense_ffn_params * d / self.bw) if self.dense_layers else 0.0
        head = max(2 * n_sampled * self.head_params / self.flops, self.head_params * d / self.bw)
        return dense + head + self.hw.step_overhead_s

    # ---- a whole step ----------------------------------------------------------
    def step(self, t0: float, plan, n_tokens: int, n_sampled: int, attn_ctx: float, kv_tokens: int,
             n_requests: int = 1) -> StepTiming:
        attn = self.attention_s(n_tokens, attn_ctx, kv_tokens, n_requests)
        ffn = self.experts_s(plan.counts, n_tokens)
        fixed = self.fixed_s(n_tokens, n_sampled) + plan.extra_time_s
        L = len(ffn)
        n_copies = int(plan.demand.sum() + plan.early.sum()) + plan.ahead
        if n_copies == 0:
            compute = L * attn + float(ffn.sum())
            return StepTiming(fixed + compute, 0.0, 0.0)
        if not plan.early.any() and not plan.ahead:
            return self._step_demand_only(t0, plan.demand, attn, ffn, fixed)
        return self._step_with_copies(t0, plan, attn, ffn, fixed)

    def _step_demand_only(self, t0, demand, attn, ffn, fixed) -> StepTiming:
        """Closed form of _step_with_copies when every copy is on demand: each layer's
        copies finish before the next layer's router runs, so only the first layer
        with copies can wait for a backlog left by an earlier step."""
        c = self.copy_s
        layers = np.flatnonzero(demand)
        first, last = int(layers[0]), int(layers[-1])
        ffn_before = np.concatenate([[0.0], np.cumsum(ffn)])
        router_first = t0 + fixed + (first + 1) * attn + ffn_before[first]
        wait = max(0.0, self.link_free_at - router_first)
        copies = float(demand.sum()) * c
        self.link_free_at = t0 + fixed + wait + (last + 1) * attn + ffn_before[last] + float(demand[:last + 1].sum()) * c
        return StepTiming(fixed + len(ffn) * attn + ffn_before[-1] + copies + wait, copies, copies + wait)

    def decode_run(self, t0: float, run, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """step() for T consecutive single-token decode steps of one request, all at once:
        the same arithmetic in the same order, one element per step. Needs every copy on
        demand and no link backlog at t0 (so no step waits for an earlier one's copies).
        Returns (start times, durations, copy seconds) and leaves the link as step() would."""
        L = run.demand.shape[1]
        attn = self.attention_s(1, contexts.astype(float) + 1, contexts + 1, 1, maximum=np.maximum)
        ffn = self.experts_s(run.counts, 1)                                   # (T, L)
        fixed = self.fixed_s(1, 1)
        n_copies = run.demand.sum(axis=1)
        copies = n_copies.astype(float) * self.copy_s
        ffn_before = ffn.cumsum(axis=1)
        no_copy = fixed + (L * attn + ffn.sum(axis=1))
        with_copy = fixed + L * attn + ffn_before[:, -1] + copies
        durations = np.where(n_copies > 0, with_copy, no_copy)
        starts = np.concatenate([[t0], durations[:-1]]).cumsum()              # t0 + d0 + d1 ... in order
        j = np.flatnonzero(n_copies)
        if len(j):   # the link is free once the last step's copies are done
            j = int(j[-1])
            dem = run.demand[j]
            last = int(np.flatnonzero(dem)[-1])
            before = ffn_before[j, last - 1] if last else 0.0
            self.link_free_at = (float(starts[j]) + fixed + (last + 1) * float(attn[j]) + float(before)
                                 + float(dem[:last + 1].sum()) * self.copy_s)
        return starts, durations, copies

    def decode_upper_bound(self, contexts: np.ndarray, max_loads: int) -> np.ndarray:
        """(T,) the longest each single-token decode step could take, with at most max_loads
        experts loaded per step (what a decode run's length is cut by, to end before the
        next arrival)."""
        L, k = self.m.n_moe_layers, self.m.top_k
        attn = self.attention_s(1, contexts.astype(float) + 1, contexts + 1, 1, maximum=np.maximum)
        ffn = float(self.experts_s(np.ones((L, k), dtype=np.int64), 1).sum())
        return (self.fixed_s(1, 1) + L * attn + ffn + max_loads * self.copy_s) * (1 + 1e-9)

    def _step_with_copies(self, t0, plan, attn, ffn, fixed) -> StepTiming:
        c = self.copy_s
        L = len(ffn)
        free = max(self.link_free_at, t0)
        busy = 0.0
        stall = 0.0
        pending = deque()                  # prefetch items [issue time, copies, layer or -1]
        arrived = {}
        t = t0 + fixed                     # overheads (host work, LM head) placed first
        if plan.ahead:
            pending.append([t0, plan.ahead, -1])

        def run_pending(limit):
            nonlocal free, busy
            while pending and max(pending[0][0], free) < limit:
                issue, n, layer = pending.popleft()
                start = max(issue, free)
                free = start + n * c
                busy += n * c
                if layer >= 0:
                    arrived[layer] = free

        early = plan.early
        lead = max(plan.lead, 1)
        for layer in range(L):
            # Prefetches for layer + lead are issued as this layer starts (those for the
            # first `lead` layers at step start, i.e. also now when layer == 0).
            targets = range(0, min(lead + 1, L)) if layer == 0 else (layer + lead,)
            for target in targets:
                if target < L and early[target]:
                    pending.append([t, int(early[target]), target])
            router_done = t + attn
            run_pending(router_done)
            n_dem = int(plan.demand[layer])
            for item in list(pending):     # a prefetch for this layer not started yet: now demand
                if item[2] == layer:
                    pending.remove(item)
                    n_dem += item[1]
            ready = router_done
            if n_dem:
                start = max(router_done, free)
                free = start + n_dem * c
                busy += n_dem * c
                ready = free
            if layer in arrived:
                ready = max(ready, arrived[layer])
            stall += ready - router_done
            t = ready + ffn[layer]
        run_pending(float("inf"))          # what is left (prefetch for later steps) runs on
        self.link_free_at = free
        return StepTiming(t - t0, busy, stall)
