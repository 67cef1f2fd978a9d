"""The simulated serving engine: SimPy drives arrivals and engine steps.

Continuous batching with chunked prefill (vLLM v1 style): every step carries one
token for each decoding request plus prompt chunks of newly admitted requests,
up to limits.max_batch_tokens. Per step, the policy serves the batch's routing
(from the trace) and the cost model turns the plan into time. KV memory grows
per token; when it runs out, the latest admitted request is preempted and later
recomputed from scratch (vLLM's recompute preemption). At light load, a request
decoding alone is advanced by *decode runs* (many steps planned at once, one SimPy
event), with the same results as stepping (see _decode_run); at saturation, the same
requests decoding together by *batch runs* (_batch_run).

One loop on two clocks: the replayer (replay/engine.py) runs this same loop on the
wall clock (sim/clock.py); it differs only in how a step is executed (`execute`) and
how memory is read (`memory_parts`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from sortedcontainers import SortedKeyList

from sim.clock import VirtualClock
from sim.costmodel import CostModel, StepTiming
from sim.memory import MemoryLedger
from sim.policies.base import ExpertPolicy, StepBatch
from sim.resultlog import RequestLog
from sim.schedulers.base import Scheduler
from sim.timeline import TIMELINE_COLUMNS, TimelineLog, TimelineRow, rows_from_columns  # noqa: F401 (TIMELINE_COLUMNS: re-exported)


@dataclass(kw_only=True)
class StepWork:
    """The tokens of one engine step: who is in it and which trace rows they process."""
    decode: list            # requests generating one token
    chunks: list            # (request, prompt tokens) being prefilled
    rows: np.ndarray        # trace rows, decode tokens first
    batch: StepBatch
    n_new: int              # KV entries this step adds
    n_tokens: int
    n_sampled: int          # requests that produce a token
    attn_ctx: float         # sum over tokens of the context attended to
    kv_read: int            # KV entries read
    prefill_ctx: float = 0.0   # the part of attn_ctx that prompt-chunk tokens attend to


class Engine:
    def __init__(self, model, hw, trace, requests, policy, scheduler, limits: dict, progress=None, clock=None):
        """requests: Requests (any order), or an Arrivals (sim/workload.py), which builds them in
        arrival order as they arrive; each request's row goes to the request table when it leaves."""
        self.model, self.hw, self.trace = model, hw, trace
        self.clock = clock or VirtualClock()
        self.n_requests = len(requests)
        in_order = getattr(requests, "in_arrival_order", False)   # sim/workload.py Arrivals
        self._to_arrive = iter(requests if in_order else sorted(requests, key=lambda r: (r.arrival_s, r.index)))
        self.policy, self.scheduler = policy, scheduler
        # First come first served, by the base select(), for a policy blind to arrivals: an
        # arrival only joins the back of the queue, so it is counted as it arrives and its
        # Request is built when admission reaches it (_top_up). A million requests arriving at
        # once are then a count, not a million Requests. Others see each arrival as a Request.
        self._fifo = scheduler.static_key and type(scheduler).key is Scheduler.key
        self._base_select = type(scheduler).select is Scheduler.select
        lazy = (in_order and self._fifo and self._base_select and hasattr(requests, "times_in_order")
                and type(policy).on_arrival is ExpertPolicy.on_arrival)
        self._lazy_times = requests.times_in_order() if lazy else None
        self._backlog = 0              # arrived, not yet built: the queue's tail, in arrival order
        self.max_tokens = int(limits["max_batch_tokens"])
        self.max_running = int(limits["max_running"])
        self.max_steps = int(limits.get("max_steps") or 0)
        self.max_time = float(limits.get("max_sim_time_s") or 0.0)
        # Decode runs plan many steps as one event: only where time is computed, not lived.
        self.decode_runs = self.clock.decode_runs and bool(limits.get("decode_runs", True))
        self.cost = CostModel(model, hw)
        scheduler.attach(policy, self.cost, self.max_tokens)
        self.mem = MemoryLedger(model, hw, policy, self.max_tokens, float(limits["memory_utilization"]))
        # The waiting queue: in the scheduler's order when its key is static (a sorted list:
        # admitting or re-queueing costs O(log n), where a Python list's front removal moved all
        # n entries, which a million queued requests made the run's largest cost); else arrival order.
        self.waiting = SortedKeyList(key=self._queue_key) if scheduler.static_key else []
        self.running: list = []
        self.n_finished = self.n_rejected = 0
        self.served = RequestLog()         # the request table: rows of requests that left
        self.timeline = TimelineLog()      # TimelineRow fields, in order (decode runs add plain tuples)
        self.steps = 0
        self.preemptions = 0
        self.progress = progress
        self._wake = None
        self._next_arrival_s = 0.0     # when the arrival process next enqueues a request
        self._arriving = None          # ... and which request that is (not for a lazy queue)
        self._awaiting = False         # an arrival's event is pending
        self._run_arrivals = None      # (time, scheduled at) of arrivals during a batch run
        self._arrival_scheduled = 0.0  # when the awaited arrival's event was set
        self._last_step_start = 0.0    # of the run now in progress
        self._run_rows = None          # a batch run's timeline columns, written when it ends
        self.stopped_early = ""
        self.elapsed_s: float | None = None   # the clock when serving ended (set by run)

    # ---- SimPy processes ----------------------------------------------------------
    def run(self) -> Engine:
        env = self.clock.environment()
        self.env = env
        env.process(self._arrivals(env))
        # The run ends when serving ends: at a limit, arrivals still to come are not waited for
        # (on the wall clock that wait would be real time).
        env.run(until=env.process(self._serve(env)))
        self.elapsed_s = self.clock.elapsed_s(env)
        return self

    def _arrivals(self, env):
        if self._lazy_times is not None:
            yield from self._arrivals_counted(env)
            return
        for req in self._to_arrive:
            self._arriving, self._next_arrival_s = req, req.arrival_s
            if req.arrival_s > env.now:
                self._arrival_scheduled = env.now    # when its event was set (SimPy's tie order)
                self._awaiting = True
                yield env.timeout(req.arrival_s - env.now)
                self._awaiting = False
            self._arriving = None
            if self._run_arrivals is not None:    # during a batch run: its timeline counts them
                self._run_arrivals.append((env.now, self._arrival_scheduled))
            self.enqueue(req)
            self.policy.on_arrival(req, env.now)
            if self._wake is not None and not self._wake.triggered:
                self._wake.succeed()
        self._next_arrival_s = float("inf")

    def _arrivals_counted(self, env):
        """_arrivals for a lazy queue: the same events, each arrival a count (the Request is
        built by _top_up). Arrivals due by the time one is handled are handled with it, as
        _arrivals handles them without yielding."""
        times, i, n = self._lazy_times, 0, len(self._lazy_times)
        while i < n:
            self._next_arrival_s = t = float(times[i])
            if t > env.now:
                self._arrival_scheduled = env.now
                self._awaiting = True
                yield env.timeout(t - env.now)
                self._awaiting = False
            j = max(i + 1, int(np.searchsorted(times, env.now, side="right")))
            if self._run_arrivals is not None:
                self._run_arrivals.extend([(env.now, self._arrival_scheduled)] * (j - i))
            self._backlog += j - i
            i = j
            if self._wake is not None and not self._wake.triggered:
                self._wake.succeed()
        self._next_arrival_s = float("inf")

    @property
    def n_waiting(self) -> int:
        """Requests in the waiting queue, built or not (a lazy queue's tail is a count)."""
        return len(self.waiting) + self._backlog

    def _top_up(self, slots: int) -> None:
        """Build the lazy queue's next arrivals until its built part holds one more request than
        there are free slots: first come first served admits no further than that."""
        while self._backlog and len(self.waiting) <= slots:
            self._backlog -= 1
            self.enqueue(next(self._to_arrive))

    def _serve(self, env):
        while self.n_finished + self.n_rejected < self.n_requests:
            if (self.max_steps and self.steps >= self.max_steps) or (self.max_time and env.now >= self.max_time):
                self.stopped_early = f"stopped at limit (steps={self.steps}, t={env.now:.1f}s)"
                return
            self._admit(env.now)
            if not self.running:
                if self.n_finished + self.n_rejected >= self.n_requests:   # the last ones were refused
                    break
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            run = self._decode_run(env.now) or self._batch_run(env.now)
            if run:
                reqs, n_steps, end = run
                start, last_start = env.now, self._last_step_start
                yield env.timeout(end - env.now)
                # An arrival due now whose event was set during the run, before its last step
                # began: stepping's last event was set at that step's start, after the arrival's,
                # so SimPy handled the arrival first. Let it.
                if (self._awaiting and self._next_arrival_s == env.now
                        and start <= self._arrival_scheduled < last_start):
                    yield env.timeout(0)
                self._advance_run(reqs, n_steps, env.now)
                continue
            yield env.timeout(self._step(env.now))
            self._advance(env.now)

    def enqueue(self, req) -> None:
        """Into the waiting queue, kept in the scheduler's order when its key is static."""
        if self.scheduler.static_key:
            self.waiting.add(req)
        else:
            self.waiting.append(req)

    def _unqueue(self, req) -> None:
        """Out of the waiting queue. A sorted queue finds a request by its key; one whose key
        moved since it was queued (a scheduler breaking the static_key promise) is found by
        identity instead of failing."""
        try:
            self.waiting.remove(req)
        except ValueError:
            if not isinstance(self.waiting, SortedKeyList):
                raise
            del self.waiting[next(i for i, r in enumerate(self.waiting) if r is req)]

    def _queue_key(self, req):
        return self.scheduler.key(req, 0.0)

    # ---- admission -------------------------------------------------------------------
    def _admit(self, now: float):
        if not self.n_waiting:
            return
        mem = self.mem
        # KV already promised: held now, plus the prompt still to prefill of running requests.
        state = {"running": len(self.running),
                 "tokens": sum(r.prompt_tokens - r.prefilled for r in self.running) + len(self.running)}

        def fits(req) -> bool:
            if state["running"] >= self.max_running:
                return False
            need = req.prompt_tokens + 1
            if need * mem.kv_per_token > mem.kv_budget:   # can never fit: rejected below, blocks nobody
                return True
            if not mem.kv_fits(state["tokens"] + need):
                return False
            state["running"] += 1
            state["tokens"] += need
            return True

        while True:
            self._top_up(self.max_running - state["running"])
            for req in self.scheduler.select(self.waiting, self.running, now, fits):
                self._unqueue(req)
                if (req.prompt_tokens + 1) * mem.kv_per_token > mem.kv_budget:
                    req.rejected = (f"prompt of {req.prompt_tokens} tokens needs "
                                    f"{(req.prompt_tokens + 1) * mem.kv_per_token / 1e9:.2f} GB of KV cache, "
                                    f"more than the {mem.kv_budget / 1e9:.2f} GB left")
                    self.n_rejected += 1
                    self._release(req)
                    continue
                if req.admitted_s is None:
                    req.admitted_s = now
                self.running.append(req)
                self.policy.on_admit(req, now)
            if self.waiting or not self._backlog:   # stopped at a request that did not fit, or all in
                return

    def _preempt_for(self, new_tokens: int):
        """Free KV (latest admitted first) until this step's new tokens fit."""
        while len(self.running) > 1 and not self.mem.kv_fits(new_tokens):
            victim = self.running.pop()
            self.mem.kv_used -= victim.context * self.mem.kv_per_token
            new_tokens -= 1 if not victim.in_prefill else min(victim.prompt_tokens - victim.prefilled,
                                                               self.max_tokens)
            victim.prefilled = 0
            victim.generated = 0
            victim.preemptions += 1
            self.preemptions += 1
            self.enqueue(victim)

    # ---- one step ----------------------------------------------------------------------
    def _plan_tokens(self):
        """Rows of this step: one per decoding request, then prompt chunks in admission order."""
        decode, prefill = [], []
        for r in self.running:
            (prefill if r.in_prefill else decode).append(r)
        budget = self.max_tokens - len(decode)
        chunks = []
        for r in prefill:
            if budget <= 0:
                break
            c = min(r.prompt_tokens - r.prefilled, budget)
            chunks.append((r, c))
            budget -= c
        return decode, chunks

    def _step(self, now: float) -> float:
        work = self._build_step()
        plan = self.policy.plan_step(work.batch)
        timing = self.execute(now, work, plan)
        self.mem.kv_used += work.n_new * self.mem.kv_per_token
        parts = self.memory_parts(plan, work)
        # How long the step lasts on the clock: on the wall clock, until now (the loop's own
        # work since the last event included), so a replay's steps tile its time line.
        step_s = self.clock.step_s(self.env, timing.duration_s)
        self.timeline.append(TimelineRow(
            t_s=now, step_s=step_s, tokens=work.n_tokens, batch_requests=len(work.batch.requests),
            running=len(self.running), waiting=self.n_waiting, decode_tokens=len(work.decode),
            prefill_tokens=work.n_tokens - len(work.decode), mem_dense=parts["dense"], mem_experts=parts["experts"],
            mem_kv=parts["kv"], mem_activations=parts["activations"], mem_predictor=parts["predictor"],
            link_busy_s=timing.link_busy_s, stall_s=timing.stall_s, expert_loads=plan.copies,
            active_experts=int((plan.counts > 0).sum()), attn_ctx=work.attn_ctx, sampled=work.n_sampled,
            prefill_ctx=work.prefill_ctx))
        self._chunks = work.chunks
        self._decode = work.decode
        self.steps += 1
        self.scheduler.on_step(self.running, timing.duration_s, now)
        return step_s

    def _build_step(self, planned: tuple | None = None) -> StepWork:
        decode, chunks = planned or self._plan_tokens()
        n_new = len(decode) + sum(c for _, c in chunks)
        if not self.mem.kv_fits(n_new):
            self._preempt_for(n_new)
            decode, chunks = self._plan_tokens()
            n_new = len(decode) + sum(c for _, c in chunks)
        reqs = decode + [r for r, _ in chunks]
        # One pass over the decoding requests (a saturated step has dozens): a decoding
        # request's next row is row0 + prompt + generated - 1 and its context prompt + generated - 1.
        next_rows, decode_ctx = [], 0
        for r in decode:
            ctx = r.prompt_tokens + r.generated - 1
            next_rows.append(r.row0 + ctx)
            decode_ctx += ctx
        rows = np.array(next_rows, dtype=np.int64)
        token_req = np.arange(len(decode))
        attn_ctx = float(decode_ctx) + len(decode)
        kv_read = decode_ctx + sum(r.prefilled for r, _ in chunks) + n_new   # a prefilling request has generated 0
        prefill_ctx = 0.0
        if chunks:
            rows = np.concatenate([rows] + [np.arange(r.next_row, r.next_row + c) for r, c in chunks])
            token_req = np.concatenate([token_req] + [np.full(c, len(decode) + i) for i, (_, c) in enumerate(chunks)])
            prefill_ctx = sum(c * r.prefilled + c * (c + 1) / 2 for r, c in chunks)
            attn_ctx += prefill_ctx
        t = self.trace
        batch = StepBatch(step=self.steps, experts=t.experts[rows], gates=lambda: t.gates[rows],   # (read if used)
                          probs=None if t.router_probs is None else lambda: t.router_probs[rows],
                          token_req=token_req, requests=reqs)
        n_sampled = len(decode) + sum(1 for r, c in chunks if r.prefilled + c >= r.prompt_tokens)
        return StepWork(decode=decode, chunks=chunks, rows=rows, batch=batch, n_new=n_new, n_tokens=len(rows),
                        n_sampled=n_sampled, attn_ctx=attn_ctx, kv_read=kv_read, prefill_ctx=prefill_ctx)

    def dropped_prefetches(self) -> int:
        """Prefetch copies the policy issued (and counted) that the link dropped before they
        started, their expert evicted meanwhile: they moved no bytes."""
        return self.cost.copies["dropped"]

    # ---- light load: a lone request's decode steps at once ----------------------------------
    # (limits.decode_runs: false steps one by one instead: same results, for checking)
    MAX_RUN = 512           # steps per decode run (bounds the (T, L, E) arrays)
    MAX_RUN_TOKENS = 16384  # steps x requests per batch run (bounds its (T, B, L, k) routes)

    def _decode_run(self, now: float):
        """At light load one request decodes alone for hundreds of steps and nothing else
        happens until the next arrival. Then the policy and the cost model plan those steps
        in one vectorised call (same decisions and times as step by step; sums agree to
        float rounding) instead of one SimPy round trip each. The run is cut so that every
        step starts before the next arrival even if all its experts missed. Returns
        ([request], steps, end time) or None to step normally."""
        if not self.decode_runs or len(self.running) != 1 or self.n_waiting or not self.policy.plans_decode_runs:
            return None
        req = self.running[0]
        if req.in_prefill or not self.cost.link_idle(now):
            return None
        n = min(req.output_tokens - req.generated, self.MAX_RUN)
        if self.max_steps:
            n = min(n, self.max_steps - self.steps)
        if n < 2:
            return None
        contexts = req.context + np.arange(n)
        horizon = min(self._next_arrival_s, self.max_time or float("inf"))
        longest = self.cost.decode_upper_bound(contexts, self.policy.max_decode_loads)
        latest_start = now + np.concatenate([[0.0], longest[:-1]]).cumsum()
        n = int(np.searchsorted(latest_start, horizon, side="left"))
        if n < 2:
            return None
        contexts = contexts[:n]
        row, tr = req.next_row, self.trace
        run = StepBatch(step=self.steps, experts=tr.experts[row: row + n], gates=tr.gates[row: row + n],
                        probs=None if tr.router_probs is None else tr.router_probs[row: row + n],
                        token_req=np.zeros(n, dtype=np.int64), requests=[req])
        plan = self.policy.plan_decode_run(run)
        if plan is None:
            return None
        assert len(plan.counts) >= 2, f"{type(self.policy).__name__} planned a run of {len(plan.counts)} steps"
        if len(plan.counts) < n:                           # the policy planned the first steps only
            n = len(plan.counts)
            contexts = contexts[:n]
        starts, durations, busy, stall = self.cost.decode_run(now, plan, contexts)
        mem = self.mem
        kv = mem.kv_used + np.arange(1, n + 1) * float(mem.kv_per_token)
        mem.kv_used = float(kv[-1])
        if mem.kv_block > 1:     # KV in blocks: what the lone request holds after each step
            kv = mem.kv_held(req.context + np.arange(1, n + 1)).astype(float)
        parts = mem.sample_run(plan.resident, kv, 1, 1)
        loads = plan.copies()
        active = np.count_nonzero(plan.counts, axis=(1, 2))
        attn_ctx = contexts.astype(float) + 1
        one, zero = [1] * n, [0] * n
        self.timeline.extend(rows_from_columns(
            t_s=starts.tolist(), step_s=durations.tolist(), tokens=one, batch_requests=one, running=one,
            waiting=zero, decode_tokens=one, prefill_tokens=zero, mem_dense=parts["dense"],
            mem_experts=parts["experts"], mem_kv=parts["kv"],
            mem_activations=parts["activations"], mem_predictor=parts["predictor"],
            link_busy_s=busy.tolist(), stall_s=stall.tolist(), expert_loads=loads.tolist(),
            active_experts=active.tolist(), attn_ctx=attn_ctx.tolist(), sampled=one, prefill_ctx=[0.0] * n))
        for start, d in zip(starts.tolist(), durations.tolist()):
            self.scheduler.on_step(self.running, d, start)
        self.steps += n
        self._last_step_start = float(starts[-1])
        return [req], n, float(starts[-1] + durations[-1])

    def _prefill_first(self) -> StepWork | None:
        """The next step, as _build_step builds it, if it can lead a batch run: every running
        request is in it, those prefilling with the rest of their prompts, and its KV fits (else
        stepping preempts). None otherwise."""
        decode, chunks = self._plan_tokens()
        if len(decode) + len(chunks) != len(self.running) or any(r.prefilled + c < r.prompt_tokens for r, c in chunks):
            return None
        if not self.mem.kv_fits(len(decode) + sum(c for _, c in chunks)):
            return None
        return self._build_step((decode, chunks))

    # ---- saturation: the same requests decoding together, their steps at once ---------------
    def _batch_run(self, now: float):
        """At saturation the running requests decode and nothing can join them (no slot, no
        KV for the head of the queue, or no one waiting), so the batch is the same from step
        to step until the first of them finishes. Then the policy and the cost model plan
        those steps in one vectorised call (same decisions, times to float rounding) and SimPy
        sees one event. Cut where stepping would do something else: a step whose KV would not
        fit (a preemption), max_steps, and, unless no request can join before the run ends,
        the next arrival (every step starts before it even if all its experts missed).
        Arrivals that cannot join only queue: the run's timeline counts them per step (an
        arrival at exactly a step's start counts as SimPy orders the two events). Returns
        (requests, steps, end) or None.

        A run may also start with the step that prefills the requests that just joined, when
        it takes their whole prompts (the policy's prefill_runs): at saturation, the step after
        each admission. That step is built as stepping builds it (_build_step) and planned with
        the run: its own tokens, context and activations, the others' decode steps after it."""
        running, policy = self.running, self.policy
        B = len(running)
        if (not self.decode_runs or not B or (B == 1 and not self.n_waiting) or not policy.plans_batch_runs
                or not self.cost.link_idle(now)):
            return None
        # (a run led by a prefill step: not for a scheduler that watches each step, as the eMoE
        # scheduler's on_step reads the requests' progress, which a run applies only at its end)
        prefilling = any(r.in_prefill for r in running)
        if prefilling and not (policy.plans_prefill_runs and type(self.scheduler).on_step is Scheduler.on_step):
            return None
        base_select = self._base_select
        # Nobody waiting can join while every slot is taken, or while the head of the queue, in
        # the scheduler's fixed order, did not fit just now (the base select() stops at it; the
        # KV it would need only grows scarcer as the batch decodes). The base select() has no
        # side effects to skip (the eMoE scheduler's records vetoes).
        full = B >= self.max_running
        head_blocked = bool(self.n_waiting) and self.scheduler.static_key
        if self.n_waiting and not ((full or head_blocked) and base_select):
            return None
        # Arrivals during the run change nothing if they cannot join (no slot, or they queue
        # behind a blocked head: first come first served; under SJF or EDF one may become the
        # head and fit), the policy does not look at them (the eMoE policy counts them) and the
        # scheduler's select() is the base one (the eMoE scheduler's must see each arrival at
        # every step, as stepping shows it).
        closed = full or (head_blocked and self._fifo)
        arrivals_join = not closed or type(policy).on_arrival is not ExpertPolicy.on_arrival or not base_select
        n = min(min(r.output_tokens - r.generated for r in running), self.MAX_RUN, max(2, self.MAX_RUN_TOKENS // B))
        if self.max_steps:
            n = min(n, self.max_steps - self.steps)
        first = self._prefill_first() if prefilling and n >= 2 else None   # (built once the cheap checks pass)
        if prefilling and first is None:
            return None
        mem = self.mem
        new_kv = np.full(n, B * mem.kv_per_token)
        if first is not None:
            new_kv[0] = first.n_new * mem.kv_per_token
        kv = np.concatenate([[mem.kv_used], new_kv]).cumsum()   # as kv_used += each step
        fits = kv[:-1] + new_kv <= mem.kv_budget          # stepping's kv_fits, step by step
        if not fits.all():
            n = int(np.argmin(fits))                      # the step that would preempt
        if n < 2:
            return None
        # Each request's context as of step 0 as if it decoded then (a joining one: its prompt
        # less one); from step 1 on, every request decodes.
        ctx0 = np.array([r.prompt_tokens + r.generated - 1 for r in running], dtype=np.int64)
        steps = np.arange(n)
        decode_ctx = int(ctx0.sum()) + B * steps                             # (T,) sum of contexts
        attn_ctx = decode_ctx.astype(float) + B
        kv_read = decode_ctx + B
        if first is not None:                             # step 0 as _build_step counted it
            attn_ctx[0], kv_read[0] = first.attn_ctx, first.kv_read
        horizon = min(self._next_arrival_s if arrivals_join else float("inf"), self.max_time or float("inf"))
        if horizon < float("inf"):
            longest = self.cost.batch_upper_bound(B, attn_ctx, kv_read)
            if first is not None:
                longest[0] = self.cost.batch_upper_bound(first.n_tokens, attn_ctx[:1], kv_read[:1], n_requests=B,
                                                         prefill_ctx=first.prefill_ctx)[0]
            latest_start = now + np.concatenate([[0.0], longest[:-1]]).cumsum()
            n = int(np.searchsorted(latest_start, horizon, side="left"))
            if n < 2:
                return None
            attn_ctx, kv_read, decode_ctx = attn_ctx[:n], kv_read[:n], decode_ctx[:n]
        lo = 0 if first is None else 1                    # the decode steps' rows (step 0's: first's)
        rows = (np.array([r.row0 for r in running], dtype=np.int64) + ctx0)[None, :] + np.arange(lo, n)[:, None]
        flat, tr = rows.ravel(), self.trace

        def gather(a):                                                    # (n - lo, B, ...) rows
            got = a[flat]
            return got.reshape(n - lo, B, *got.shape[1:])
        # The decode steps' gates and router probabilities are not gathered: only fetching
        # policies take batch runs, and nothing is rerouted (a plan_batch_run that read them
        # would fail loudly; the prefill step's are read from the trace if used, as stepping's).
        run = StepBatch(step=self.steps, experts=gather(tr.experts), gates=None, probs=None,
                        token_req=np.arange((n - lo) * B) % B, requests=list(running))
        plan = policy.plan_batch_run(run) if first is None else policy.plan_batch_run(run, first=first.batch)
        if plan is None:
            return None
        assert len(plan.counts) >= 2, f"{type(self.policy).__name__} planned a run of {len(plan.counts)} steps"
        if len(plan.counts) < n:                           # the policy planned the first steps only
            n = len(plan.counts)
            attn_ctx, kv_read = attn_ctx[:n], kv_read[:n]
        starts, durations, busy, stall = self.cost.batch_run(
            now, plan, B, attn_ctx, kv_read, first=None if first is None else (first.n_tokens, first.prefill_ctx))
        mem.kv_used = float(kv[n])
        if mem.kv_block > 1:     # KV in blocks: what the requests hold after each step
            held = mem.kv_held(ctx0[None, :] + np.arange(1, n + 1)[:, None]).astype(float).sum(axis=1)
        else:
            held = kv[1:n + 1]
        tokens = B
        if first is not None:
            tokens = np.full(n, B)
            tokens[0] = first.n_tokens
        parts = mem.sample_run(plan.resident, held, tokens, B)
        self._run_rows = dict(
            t_s=starts, step_s=durations, mem_dense=parts["dense"], mem_experts=parts["experts"],
            mem_kv=parts["kv"], mem_activations=parts["activations"], mem_predictor=parts["predictor"],
            link_busy_s=busy, stall_s=stall, expert_loads=plan.copies(),
            active_experts=np.count_nonzero(plan.counts, axis=(1, 2)), attn_ctx=attn_ctx, B=B,
            waiting=self.n_waiting, first=first,
            # an arrival handled just now, before this run was planned, set the next one's event first
            won=now if self._arrival_scheduled == now else None)
        self._run_arrivals = []
        if type(self.scheduler).on_step is not Scheduler.on_step:
            for start, d in zip(starts.tolist(), durations.tolist()):
                self.scheduler.on_step(running, d, start)
        self.steps += n
        self._last_step_start = float(starts[-1])
        return list(running), n, float(starts[-1] + durations[-1])

    def _table_batch_run(self) -> None:
        """A batch run's timeline rows, once it ended: each step's `waiting` counts the requests
        that arrived before it started (at exactly its start: if their arrival event was
        scheduled before the previous step's end event, as SimPy orders ties)."""
        c, arrived = self._run_rows, self._run_arrivals
        self._run_rows = self._run_arrivals = None
        starts, n, B = c["t_s"], len(c["t_s"]), c["B"]
        waiting = np.full(n, c["waiting"])
        won = c["won"]      # the step start at which the previous arrival won its tie
        for at, scheduled in arrived:
            first = int(np.searchsorted(starts, at, side="right"))      # steps starting after it
            j = first - 1                                               # a step starting at exactly `at`
            if 0 < j < n and starts[j] == at and (scheduled < starts[j - 1]
                                                  or scheduled == starts[j - 1] == won
                                                  or won == at):        # (one event: with the one that won)
                first, won = j, at                                      # SimPy handles the arrival first
            waiting[first:] += 1
        same = [B] * n
        tokens, decode, prefill, prefill_ctx = same, same, [0] * n, [0.0] * n
        lead = c["first"]
        if lead is not None:                           # step 0 prefilled the requests that joined
            tokens, decode, prefill, prefill_ctx = list(same), list(same), list(prefill), list(prefill_ctx)
            tokens[0], decode[0] = lead.n_tokens, len(lead.decode)
            prefill[0], prefill_ctx[0] = lead.n_tokens - len(lead.decode), lead.prefill_ctx
        self.timeline.extend(rows_from_columns(
            t_s=starts.tolist(), step_s=c["step_s"].tolist(), tokens=tokens, batch_requests=same, running=same,
            waiting=waiting.tolist(), decode_tokens=decode, prefill_tokens=prefill,
            mem_dense=c["mem_dense"], mem_experts=c["mem_experts"], mem_kv=c["mem_kv"],
            mem_activations=c["mem_activations"], mem_predictor=c["mem_predictor"],
            link_busy_s=c["link_busy_s"].tolist(), stall_s=c["stall_s"].tolist(),
            expert_loads=c["expert_loads"].tolist(), active_experts=c["active_experts"].tolist(),
            attn_ctx=c["attn_ctx"].tolist(), sampled=same, prefill_ctx=prefill_ctx))

    def _advance_run(self, reqs: list, n_steps: int, now: float):
        """_advance for a decode or batch run: each request generated n_steps tokens (those that
        joined: their prompt in step 0, their first token at its end, then one a step)."""
        if self._run_rows is not None:
            first = self._run_rows["first"]
            if first is not None:
                end0 = float(self._run_rows["t_s"][1])
                for r, c in first.chunks:
                    r.prefilled += c
                    if r.first_token_s is None:
                        r.first_token_s = end0
            self._table_batch_run()
        done = []
        for r in reqs:
            r.generated += n_steps
            if r.generated >= r.output_tokens:
                done.append(r)
        self._finish(done, now)

    # ---- what differs between the simulator and the replayer ---------------------------------
    def execute(self, now: float, work: StepWork, plan) -> StepTiming:
        """The step's time: the cost model here, real execution in the replayer."""
        return self.cost.step(now, plan, work.n_tokens, work.n_sampled, work.attn_ctx, work.kv_read,
                              len(work.batch.requests), held=self.policy.resident, prefill_ctx=work.prefill_ctx)

    def memory_parts(self, plan, work: StepWork) -> dict:
        """The step's memory by part: the ledger here, measured bytes in the replayer."""
        kv = self.kv_held_bytes(work) if self.mem.kv_block > 1 else None
        return self.mem.sample(int(self.policy.resident.sum()), work.n_tokens, work.n_sampled, kv)

    def kv_held_bytes(self, work: StepWork) -> float:
        """KV held once the step's tokens are written, in whole blocks per request."""
        new = {r.index: 1 for r in work.decode}
        new.update((r.index, c) for r, c in work.chunks)
        return float(sum(self.mem.kv_held(r.context + new.get(r.index, 0)) for r in self.running))

    def _advance(self, now: float):
        """Apply the step's progress once its time has passed."""
        done = []
        for r in self._decode:
            r.generated += 1
            if r.generated >= r.output_tokens:
                done.append(r)
        for r, c in self._chunks:
            r.prefilled += c
            if not r.in_prefill:
                r.generated = 1
                if r.first_token_s is None:
                    r.first_token_s = now
                if r.generated >= r.output_tokens:
                    done.append(r)
        self._finish(done, now)

    def _release(self, req) -> None:
        """A request left (served or refused): its row goes to the request table, and a
        streamed trace may drop its routing."""
        self.served.add(req)
        if self.trace is not None:
            self.trace.release(req.index)

    def tables(self):
        """(request table, timeline) as TableLogs, once serving ended: requests still running,
        waiting or not yet arrived (a run stopped at a limit) are tabled as they stand."""
        if self._to_arrive is not None:
            arriving = [self._arriving] if self._arriving is not None else []
            self.served.close(itertools.chain(self.running, self.waiting, arriving, self._to_arrive))
            self._to_arrive = None
        return self.served.table, self.timeline.table()

    def _finish(self, done: list, now: float):
        for r in done:
            r.finish_s = now
            self.running.remove(r)
            self.mem.kv_used -= r.context * self.mem.kv_per_token
            self.n_finished += 1
            self.policy.on_finish(r, now)
            self.scheduler.on_finish(r, now)
            self._release(r)
        if done and self.progress:
            self.progress(len(done))
        if not self.running:
            self.mem.kv_used = 0.0   # guard float drift

