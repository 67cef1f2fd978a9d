"""How long an engine step takes: roofline compute per layer, expert copies over one
host-to-device link, and their overlap.

Compute (per transformer layer, roofline: max(flops / rate, bytes / bandwidth)):
- attention: projections over the step's tokens, plus QK^T and AV over each
  token's context; reads the projection weights and every request's KV cache;
- experts: each expert with t > 0 tokens reads its weights once and does
  2 * t * params flops; a shared expert / dense FFN serves every token;
- the LM head for each request that samples a token, and fixed overheads.

The copy rule (the same for every policy, and the replayer's, replay/model.py):
- one link, one expert per copy (latency + bytes / bandwidth), never preempted;
- a layer's experts compute only once every one of them has arrived, whoever
  issued its copy: a demand copy, a prefetch of this step, or a prefetch of an
  earlier step still in flight or queued. Experts that do not fit a full cache
  stream through the staging buffer (top_k slots) after the layer's other demand
  copies: the layer computes its cached experts first, then each streamed one as it
  lands, and a streamed copy waits for a free staging slot;
- demand copies (experts a layer uses that are not resident) are issued once
  the layer's router has run and go before every queued prefetch, behind the
  copy in flight only;
- prefetch copies (StepPlan.prefetch) are queued in issue order and start when
  the link is free; one that a layer needs before it has started is promoted to
  demand; one whose expert the policy evicts before it starts is dropped.
The link's state (when the copy in flight ends, the queue, when each started
prefetch lands) carries from step to step. It is advanced lazily, as far as the
next demand needs, which gives the same times as an event per copy.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


class _StepOf:
    """Step j of a RunPlan, as the layer walk (_step_with_copies) reads a StepPlan."""
    prefetch = ()

    def __init__(self, run, j: int):
        self.counts, self.demand = run.counts[j], run.demand[j]
        self.streamed = None if run.streamed is None else run.streamed[j]
        self.missing = None if run.missing is None else run.missing[j]


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
        # The link: when the last started copy ends; prefetch copies not started yet
        # ([issue time, layer, expert], in issue order); layer -> {expert: landing time} of
        # started prefetch copies that may not have landed.
        self.link_free_at = 0.0
        self.queued: deque = deque()
        self.landing: dict[int, dict[int, float]] = {}
        self._busy = 0.0
        # Copies by kind: issued on demand, issued as prefetches (of which promoted to demand
        # or dropped before starting); the replay's link counts the same (replay/link.py).
        self.copies = dict(demand=0, prefetch=0, promoted=0, dropped=0)
        self.measured = measured_for(hw, model)
        self._recording = False
        self._origin = 0.0                 # where the layer walk's clock starts (_step_with_copies)
        # Per-layer events of steps starting in record_window (`emoe timeline --layers`): each
        # layer's attention, expert compute and stall, each copy on the link. Recording steps
        # take the copy-by-copy walk, which the closed forms equal (tests/test_costmodel.py).
        self.record: list[dict] | None = None
        self.record_window = (0.0, float("inf"))

    # ---- compute ------------------------------------------------------------
    def attention_s(self, n_tokens: int, attn_ctx: float, kv_tokens: int, n_requests: int = 1,
                    maximum=max, prefill_ctx: float = 0.0) -> float:
        """One layer's attention. attn_ctx: sum over tokens of the context each attends to;
        kv_tokens: KV entries read (all requests in the step); prefill_ctx: the part of attn_ctx
        that prompt-chunk tokens attend to. With maximum=np.maximum, attn_ctx and kv_tokens may
        be arrays (one per step)."""
        if self.measured:
            a = self.measured["attention_s"]
            t = a["a"] + a["b"] * n_tokens + a["c"] * attn_ctx + a["d"] * n_requests
            # A prompt chunk's scores (tokens x context) cost more per element than a decode
            # token's once they leave the cache: e, where the profile measured it (older ones: none).
            return t + a["e"] * prefill_ctx if a.get("e") else t
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
             n_requests: int = 1, held: np.ndarray | None = None, prefill_ctx: float = 0.0) -> StepTiming:
        """held: (L, E) the experts the policy holds after planning; queued prefetches of
        experts it no longer holds (or copies again on demand) are dropped; prefill_ctx: the part
        of attn_ctx that prompt-chunk tokens attend to."""
        attn = self.attention_s(n_tokens, attn_ctx, kv_tokens, n_requests, prefill_ctx=prefill_ctx)
        ffn = self.experts_s(plan.counts, n_tokens)
        fixed = self.fixed_s(n_tokens, n_sampled) + plan.extra_time_s
        self._recording = self.record is not None and self.record_window[0] <= t0 <= self.record_window[1]
        if self._recording or self.queued or plan.prefetch or (self.landing and self._uses_landing(t0, plan.counts)):
            self._busy = 0.0
            if held is not None and self.queued:
                self._drop_unheld(t0, held if plan.missing is None else held & ~plan.missing)
            return self._step_with_copies(t0, plan, attn, ffn, fixed)
        if not plan.demand.any():
            return StepTiming(fixed + len(ffn) * attn + float(ffn.sum()), 0.0, 0.0)
        if plan.staged:
            # The closed form holds when no staging slot binds and the link is free at the step's
            # start (a copy still in flight delays a layer's streamed copies, not its cached
            # experts, which the closed form does not tell apart): else walk the layers.
            streamed_s = None if self.link_free_at > t0 else self._streamed_closed_form(plan, ffn)
            if streamed_s is None:
                self._busy = 0.0
                return self._step_with_copies(t0, plan, attn, ffn, fixed)
            return self._step_demand_streamed(t0, plan.demand, streamed_s, attn, ffn, fixed)
        return self._step_demand_only(t0, plan.demand, attn, ffn, fixed)

    def link_idle(self, t: float) -> bool:
        """Nothing in flight or queued on the link at time t."""
        return not self.queued and self.link_free_at <= t

    def _uses_landing(self, t0: float, counts: np.ndarray) -> bool:
        """Whether the step uses an expert whose prefetch copy lands after t0 (forgetting the landed)."""
        if self.link_free_at <= t0:
            self.landing.clear()
            return False
        uses = False
        for layer in list(self.landing):
            d = self.landing[layer]
            for e in [e for e, end in d.items() if end <= t0]:
                del d[e]
            if not d:
                del self.landing[layer]
            elif any(counts[layer, e] for e in d):
                uses = True
        return uses

    def _drop_unheld(self, t0: float, held: np.ndarray) -> None:
        """Queued prefetch copies of experts the policy evicted before they started: dropped."""
        self._run_queued(t0)
        if any(not held[layer, e] for _, layer, e in self.queued):
            kept = deque(q for q in self.queued if held[q[1], q[2]])
            self.copies["dropped"] += len(self.queued) - len(kept)
            self.queued = kept

    def _step_demand_only(self, t0, demand, attn, ffn, fixed) -> StepTiming:
        """Closed form of _step_with_copies when every copy is on demand into the cache and no
        layer waits for a prefetch: each layer's copies finish before the next layer's router
        runs, so only the first layer with copies can wait for a copy in flight from an earlier
        step."""
        c = self.copy_s
        layers = np.flatnonzero(demand)
        first, last = int(layers[0]), int(layers[-1])
        ffn_before = np.concatenate([[0.0], np.cumsum(ffn)])
        router_first = t0 + fixed + (first + 1) * attn + ffn_before[first]
        wait = max(0.0, self.link_free_at - router_first)
        n = int(demand.sum())
        self.copies["demand"] += n
        copies = n * c
        self.link_free_at = (t0 + fixed + wait + (last + 1) * attn + ffn_before[last]
                             + float(demand[:last + 1].sum()) * c)
        return StepTiming(fixed + len(ffn) * attn + ffn_before[-1] + copies + wait, copies, copies + wait)

    def _streamed_closed_form(self, plan, ffn):
        """(L,) each layer's time added by its streamed experts beyond their copies, when no
        staging slot ever binds (so _stream's recurrence has a closed form); else None.
        With copies back to back and no slot binding, a layer with s streamed experts (each
        computing `each`) ends max(ffn, s * c + each) after its cached copies: its cached
        experts compute while the streamed ones copy, the last streamed one after it lands."""
        c, k = self.copy_s, self.m.top_k
        s = plan.streamed
        on = s > 0
        each = ffn / np.maximum(np.add.reduce(plan.counts > 0, axis=1), np.maximum(s, 1))
        # No slot binds: copy j + k starts after expert j computed (each <= c, and the cached
        # experts plus one streamed one compute within k copies).
        if k < 2 or (on & ((each > c) | (ffn - (s - 1) * each > k * c))).any():
            return None
        return np.where(on, np.maximum(0.0, s * c + each - ffn) - s * c, 0.0)   # max(ffn, s c + each) - ffn - s c

    def _link_after_streamed(self, t0, demand, attn, ffn_cum, added_cum, fixed) -> tuple[float, float]:
        """(when the link is free after, how long the first layer with copies waits for it) for a
        _step_demand_streamed step, given its layers' cumulative expert and added times."""
        layers = np.flatnonzero(demand)
        first, last = int(layers[0]), int(layers[-1])
        ffn_first, ffn_last = (float(ffn_cum[i - 1]) if i else 0.0 for i in (first, last))
        added_first, added_last = (float(added_cum[i - 1]) if i else 0.0 for i in (first, last))
        router_first = t0 + fixed + (first + 1) * attn + ffn_first + added_first
        wait = max(0.0, self.link_free_at - router_first)
        return t0 + fixed + wait + (last + 1) * attn + ffn_last + added_last + float(demand[last]) * self.copy_s, wait

    def _step_demand_streamed(self, t0, demand, extra, attn, ffn, fixed) -> StepTiming:
        """_step_demand_only where some layers stream experts (closed form, _streamed_closed_form):
        a layer adds its copies plus `extra` (<= 0: streamed copies overlap its compute); the
        link is free by the next layer's router."""
        c = self.copy_s
        ffn_cum, added_cum = np.cumsum(ffn), np.cumsum(demand * c + extra)
        self.link_free_at, wait = self._link_after_streamed(t0, demand, attn, ffn_cum, added_cum, fixed)
        n = int(demand.sum())
        self.copies["demand"] += n
        return StepTiming(fixed + len(ffn) * attn + float(ffn_cum[-1]) + float(added_cum[-1]) + wait, n * c,
                          float(added_cum[-1]) + wait)

    def decode_run(self, t0: float, run, contexts: np.ndarray):
        """step() for T consecutive single-token decode steps of one request, all at once:
        the same arithmetic, one element per step. Needs an idle link at t0 (link_idle), and
        every copy on demand or, with run.prefetch, prefetched for the step's own layers (so
        each step's copies have landed before it ends and no step waits for an earlier one's).
        Returns (start times, durations, link busy seconds, stall seconds) and leaves the link
        as step() would."""
        L = run.demand.shape[1]
        attn = self.attention_s(1, contexts.astype(float) + 1, contexts + 1, 1, maximum=np.maximum)
        ffn = self.experts_s(run.counts, 1)                                   # (T, L)
        fixed = self.fixed_s(1, 1)
        if run.prefetch is not None:
            return self._run_prefetched(t0, run, attn, ffn, fixed)
        n_copies = run.demand.sum(axis=1)
        self.copies["demand"] += int(n_copies.sum())
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
        return starts, durations, copies, copies

    def _run_prefetched(self, t0: float, run, attn, ffn, fixed):
        """A decode or batch run where each step prefetches some of the experts its layers use, layer l's
        as layer l - 1 starts (layer 0's as it starts), and copies nothing on demand: the
        copy-by-copy walk (_step_with_copies) with one element per step. The link serves the
        copies in layer order, back to back from their issue; a layer computes once its own
        have landed (one not started by the layer's router is promoted to demand: the same
        start, as the link is busy until then). A step without copies is the no-copy closed
        form, as step() takes it."""
        T, L = ffn.shape
        c = self.copy_s
        n = run.prefetch                                   # (T, L) copies of each layer's experts
        t = np.full(T, fixed)                              # as each layer starts (from the step's start)
        link = np.full(T, -np.inf)                         # when the link is free (idle at each step start)
        issue = t                                          # when layer l's copies are issued
        stall = np.zeros(T)
        firsts, routers = np.empty((L, T)), np.empty((L, T))
        for layer in range(L):
            routers[layer] = router = t + attn
            nl = n[:, layer]
            has = nl > 0
            firsts[layer] = first = np.maximum(issue, link)     # its first copy starts (behind earlier layers')
            link = np.where(has, first + nl * c, link)
            ready = np.where(has, np.maximum(router, link), router)
            stall += ready - router
            issue = t                                      # layer l + 1's copies: as layer l starts
            t = ready + ffn[:, layer]
        # copies not started by their layer's router: promoted to demand (copy j starts at first + j c)
        if c > 0:
            started = np.ceil((routers - firsts) / c).clip(0).T
        else:                                              # (instant copies all start at `first`)
            started = np.where(firsts < routers, np.inf, 0.0).T
        promoted = int(np.maximum(n - started, 0).sum())
        n_copies = n.sum(axis=1)
        walked = n_copies > 0
        durations = np.where(walked, t, fixed + (L * attn + ffn.sum(axis=1)))
        starts = np.concatenate([[t0], durations[:-1]]).cumsum()
        self.copies["prefetch"] += int(n_copies.sum())
        self.copies["promoted"] += promoted
        j = np.flatnonzero(walked)
        if len(j):
            self.link_free_at = float(starts[j[-1]] + link[j[-1]])
        self.landing.clear()                   # all landed: step() would forget them at the next step
        return starts, durations, n_copies * c, np.where(walked, stall, 0.0)

    def batch_run(self, t0: float, run, n: int, attn_ctx: np.ndarray, kv_tokens: np.ndarray,
                  first: tuple[int, float] | None = None):
        """step() for T consecutive decode steps of the same n requests (n tokens a step), all
        at once: the same arithmetic in the same order, one row per step. Needs an idle link at
        t0; every step's copies then end before the step does (a layer's copies land before it
        computes), so each step finds the link idle too and no step waits for an earlier one.
        A step whose streamed copies do not fit the closed form is walked layer by layer, as
        step() does; with run.prefetch, the steps are walked as decode_run does. first: (tokens,
        prefill context) of step 0 when it prefills the requests that joined (all n sample a
        token): its terms are step()'s, from its scalars. Returns (start times, durations, link
        busy seconds, stall seconds) and leaves the link, and the copy counts, as step() would."""
        T, L = run.demand.shape
        c = self.copy_s
        self.landing.clear()                     # (step() forgets landed prefetches the same way)
        attn = self.attention_s(n, attn_ctx, kv_tokens, n, maximum=np.maximum)    # (T,)
        ffn = self.experts_s(run.counts, n)                                      # (T, L)
        fixed = np.full(T, self.fixed_s(n, n))
        if first is not None:
            assert run.prefetch is None, "a prefill step in a run that prefetches"
            n0, prefill_ctx = first
            attn[0] = self.attention_s(n0, float(attn_ctx[0]), int(kv_tokens[0]), n, prefill_ctx=prefill_ctx)
            ffn[0] = self.experts_s(run.counts[0], n0)
            fixed[0] = self.fixed_s(n0, n)
        if run.prefetch is not None:
            return self._run_prefetched(t0, run, attn, ffn, fixed[0])
        # step()'s sums in step()'s order, so the times are the same to the bit: with copies its
        # closed forms add the layers one by one (a cumsum's last element), without them ffn.sum().
        base = fixed + L * attn                  # fixed + len(ffn) * attn + ...
        n_copies = run.demand.sum(axis=1)
        copies = n_copies * c
        ffn_cum = ffn.cumsum(axis=1)
        ffn_total = ffn_cum[:, -1]
        durations = np.where(n_copies > 0, base + ffn_total + copies, base + ffn.sum(axis=1))
        busy, stall = copies, copies.copy()
        walk = np.zeros(T, dtype=bool)
        extra = None
        if run.streamed is not None:
            s = run.streamed
            on = s > 0
            each = ffn / np.maximum(np.add.reduce(run.counts > 0, axis=2), np.maximum(s, 1))
            k = self.m.top_k
            walk = on.any(axis=1) & (k < 2 or (on & ((each > c) | (ffn - (s - 1) * each > k * c))).any(axis=1))
            extra = np.where(on, np.maximum(0.0, s * c + each - ffn) - s * c, 0.0)
            added = run.demand * c + extra
            added_cum = added.cumsum(axis=1)
            added_total = added_cum[:, -1]
            closed = on.any(axis=1)
            durations = np.where(closed, base + ffn_total + added_total, durations)
            stall = np.where(closed, added_total, stall)
        walked = np.flatnonzero(walk)
        self.copies["demand"] += int(n_copies[~walk].sum())
        for j in walked.tolist():                # rare: a staging slot binds
            starts = np.concatenate([[t0], durations[:j]]).cumsum()
            plan = _StepOf(run, j)
            self._busy = 0.0
            tm = self._step_with_copies(float(starts[j]), plan, float(attn[j]), ffn[j], float(fixed[j]))
            durations[j], busy[j], stall[j] = tm.duration_s, tm.link_busy_s, tm.stall_s
        starts = np.concatenate([[t0], durations[:-1]]).cumsum()
        have = np.flatnonzero(n_copies)
        if len(have) and not walk[have[-1]]:     # the link as the last step with copies left it
            j = int(have[-1])
            if extra is not None and run.streamed[j].any():   # _step_demand_streamed's link, from the run's sums
                self.link_free_at = self._link_after_streamed(float(starts[j]), run.demand[j], float(attn[j]),
                                                              ffn_cum[j], added_cum[j], float(fixed[j]))[0]
            else:
                self.copies["demand"] -= int(n_copies[j])      # (counted again by its closed form)
                self._step_demand_only(float(starts[j]), run.demand[j], float(attn[j]), ffn[j], float(fixed[j]))
        return starts, durations, busy, stall

    def batch_upper_bound(self, n: int, attn_ctx: np.ndarray, kv_tokens: np.ndarray, n_requests: int | None = None,
                          prefill_ctx: float = 0.0) -> np.ndarray:
        """(T,) the longest each step of n tokens (n_requests requests, each sampling one: by
        default n decoding) could take: every expert active with every token, every one copied
        (what a batch run's length is cut by)."""
        L, E = self.m.n_moe_layers, self.m.n_experts
        n_requests = n if n_requests is None else n_requests
        attn = self.attention_s(n, attn_ctx, kv_tokens, n_requests, maximum=np.maximum, prefill_ctx=prefill_ctx)
        ffn = float(self.experts_s(np.full((L, E), n * self.m.top_k), n).sum())
        return (self.fixed_s(n, n_requests) + L * attn + ffn + L * min(E, n * self.m.top_k) * self.copy_s) * (1 + 1e-9)

    def decode_upper_bound(self, contexts: np.ndarray, max_loads: int) -> np.ndarray:
        """(T,) the longest each single-token decode step could take, with at most max_loads
        experts loaded per step (what a decode run's length is cut by, to end before the
        next arrival)."""
        L, k = self.m.n_moe_layers, self.m.top_k
        attn = self.attention_s(1, contexts.astype(float) + 1, contexts + 1, 1, maximum=np.maximum)
        ffn = float(self.experts_s(np.ones((L, k), dtype=np.int64), 1).sum())
        return (self.fixed_s(1, 1) + L * attn + ffn + max_loads * self.copy_s) * (1 + 1e-9)

    # ---- the link, copy by copy ---------------------------------------------------
    def _run_queued(self, limit: float) -> None:
        """Start, in order, the queued prefetch copies that start before `limit` (no demand
        copy is issued before then, so the free link takes them)."""
        queued, c = self.queued, self.copy_s
        while queued:
            issue, layer, e = queued[0]
            start = issue if issue > self.link_free_at else self.link_free_at
            if start >= limit:
                return
            queued.popleft()
            self.link_free_at = start + c
            self._busy += c
            self.landing.setdefault(layer, {})[e] = start + c
            if self._recording:
                self._event("prefetch copy", layer, start, start + c, e)

    def _issue(self, copies, t: float) -> None:
        """Queue prefetch copies issued at t (an expert already queued keeps its place)."""
        queued = self.queued
        for layer, e in copies:
            if queued and any(q[1] == layer and q[2] == e for q in queued):
                continue
            queued.append([t, layer, e])
            self.copies["prefetch"] += 1

    def _step_with_copies(self, t0, plan, attn, ffn, fixed) -> StepTiming:
        """Walk the layers, copy by copy (the copy rule above), on the step's own clock: the
        link's state is moved to it (t0 at 0) and back, so the walk's sums (a few per layer)
        keep their precision late in a long simulation, where a second's last bit is ~1e-11 s
        at a day, and its times are those a run of steps computes (CostModel._run_prefetched)."""
        self._shift(-t0, forget_landed=True)
        self._origin = t0
        try:
            return self._walk(plan, attn, ffn, fixed)
        finally:
            self._shift(t0)
            self._origin = 0.0

    def _shift(self, d: float, forget_landed: bool = False) -> None:
        """Move the link's state (times) by d seconds; forget_landed: also forget prefetches
        that landed by the new time 0 (the step's start: no layer of it or later waits for them)."""
        if forget_landed:
            for layer in list(self.landing):
                live = {e: end + d for e, end in self.landing[layer].items() if end + d > 0}
                if live:
                    self.landing[layer] = live
                else:
                    del self.landing[layer]
        if not d:
            return
        self.link_free_at += d
        for q in self.queued:
            q[0] += d
        if not forget_landed:
            for ends in self.landing.values():
                for e in ends:
                    ends[e] += d

    def _walk(self, plan, attn, ffn, fixed) -> StepTiming:
        """_step_with_copies on the step's own clock (the link's state already moved to it)."""
        t0 = 0.0
        c = self.copy_s
        counts = plan.counts
        streamed = plan.streamed
        at_point: dict[int, list] = {}
        for at, layer, e in plan.prefetch:
            at_point.setdefault(at, []).append((layer, e))
        stall = 0.0
        rec = self._event if self._recording else None
        self._issue(at_point.get(-1, ()), t0)
        t = t0 + fixed                     # overheads (host work, LM head) placed first
        if rec:
            rec("step overhead", None, t0, t)
        for layer in range(len(ffn)):
            if at_point and 2 * layer in at_point:
                self._issue(at_point[2 * layer], t)
            router_done = t + attn
            self._run_queued(router_done)
            n_dem = int(plan.demand[layer])
            self.copies["demand"] += n_dem
            promoted = ()
            if self.queued:                # queued prefetches this layer needs now: promoted to demand
                promoted = [q for q in self.queued if q[1] == layer and counts[layer, q[2]]]
                for q in promoted:
                    self.queued.remove(q)
                self.copies["promoted"] += len(promoted)
                n_dem += len(promoted)
            n_streamed = int(streamed[layer]) if streamed is not None else 0
            n_dem -= n_streamed
            ready = router_done
            if rec:
                rec("attention", layer, t, router_done)
            if n_dem:
                start = router_done if router_done > self.link_free_at else self.link_free_at
                self.link_free_at = ready = start + n_dem * c
                self._busy += n_dem * c
                if rec:
                    self._record_demand(layer, start, n_dem, plan.missing, promoted)
            landing = self.landing.get(layer)
            if landing:                    # started prefetches of its experts: wait until they land
                for e, end in landing.items():
                    if end > ready and counts[layer, e]:
                        ready = end
            stall += ready - router_done
            if rec and ready > router_done:
                rec("stall", layer, router_done, ready)
            if n_streamed:
                t, waited = self._stream(layer, n_streamed, router_done, ready, ffn[layer], counts)
                stall += waited
            else:
                t = ready + ffn[layer]
            if rec:
                rec("experts", layer, ready, t)
            if at_point and 2 * layer + 1 in at_point:
                self._issue(at_point[2 * layer + 1], router_done)
        self._run_queued(t)                # prefetch copies that start before the step ends
        return StepTiming(t - t0, self._busy, stall)

    def _stream(self, layer, n, router_done, ready, ffn, counts):
        """A layer with n streamed experts: their copies follow its other demand copies, each
        into a staging slot (top_k of them) freed once that expert has computed; the cached
        experts compute first (from `ready`), then each streamed one as it lands. Returns
        (when the layer ends, time its compute waited for streamed copies)."""
        c, k = self.copy_s, self.m.top_k
        each = ffn / max(int(np.count_nonzero(counts[layer])), n)     # one expert's share of the layer
        t = ready + ffn - n * each
        link = max(router_done, self.link_free_at)
        if k >= 2 and each <= c and t - link + each <= k * c:         # no staging slot binds
            end = max(t + n * each, link + n * c + each)
            if self._recording:
                for j in range(n):
                    self._event("streamed copy", layer, link + j * c, link + (j + 1) * c)
            self.link_free_at = link + n * c
            self._busy += n * c
            return end, end - t - n * each
        freed: list[float] = []
        waited = 0.0
        for j in range(n):
            start = link if j < k or freed[j - k] <= link else freed[j - k]
            link = start + c
            if self._recording:
                self._event("streamed copy", layer, start, link)
            if link > t:
                waited += link - t
                t = link
            t += each
            freed.append(t)
        self.link_free_at = link
        self._busy += n * c
        return t, waited

    # ---- per-layer events (`emoe timeline --layers`) -------------------------------
    def _event(self, kind: str, layer, start: float, end: float, expert=None) -> None:
        o = self._origin                   # (the walk's clock starts at its step's start)
        self.record.append(dict(kind=kind, layer=layer, start_s=float(start + o), end_s=float(end + o),
                                expert=expert))

    def _record_demand(self, layer: int, start: float, n: int, missing, promoted) -> None:
        """A layer's demand copies, back to back from `start`: the experts it misses (lowest id
        first), then promoted prefetches."""
        ids = [] if missing is None else np.flatnonzero(missing[layer]).tolist()
        ids = (ids + [q[2] for q in promoted] + [None] * n)[:n]
        for j, e in enumerate(ids):
            self._event("demand copy", layer, start + j * self.copy_s, start + (j + 1) * self.copy_s, e)
