"""The replay engine: the simulator's engine, driven by the real clock and a real model.

Batching, admission, preemption, every policy and scheduler decision and the serving
loop itself are the simulator's own code (sim/engine.py), run on the wall clock
(sim/clock.py: SimPy's real-time environment); only `execute` (run the step on the
model and time it) and `memory_parts` (measure instead of estimate) differ.

Copies follow the policy's plan under the simulator's copy rule (sim/costmodel.py),
executed by the model's host link (replay/link.py): the plan's prefetches at their
issue points, each layer's demand copies once its router has run; a layer waits for
its experts whoever copied them, and that wait is the step's measured `stall_s`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from sim.clock import WallClock
from sim.costmodel import StepTiming
from sim.engine import Engine


class ReplayEngine(Engine):
    def __init__(self, *args, model_rt, prompt_ids: dict | None = None, **kw):
        super().__init__(*args, clock=WallClock(), **kw)
        self.rt = model_rt
        # Real weights: prompts are real tokens, each decode step feeds the model's own greedy
        # token back, and routing is the model's router (recorded per trace row).
        self.prompt_ids = prompt_ids
        self.router_routes = None
        if prompt_ids is not None:
            self.router_routes = np.full(self.trace.experts.shape, -1, dtype=np.int64)
        self.cuda = model_rt.device.type == "cuda"
        for layer, e in zip(*np.nonzero(self.policy.resident)):   # the policy's starting set
            model_rt.cache.load(int(layer), int(e))
        self._initial = int(self.policy.resident.sum())             # copies made before the first step
        self._resident = self.policy.resident.copy()

    def run(self) -> ReplayEngine:
        super().run()            # the simulator's loop, on the wall clock
        self.rt.cache.drain()    # prefetches still on the link: land them, so the copy counters are final
        return self

    def dropped_prefetches(self) -> int:
        return self.rt.cache.link.counts["dropped"]     # the real link's count

    def layer_events(self) -> list[dict] | None:
        """Each layer's attention, experts and stall and each copy, in the run's seconds (on
        CUDA from the device's timing events, pinned to the wall clock by an anchor)."""
        if not hasattr(self, "env"):
            return None
        self.rt.cache.settle(wait=True)
        events = self.rt.cache.events
        t0 = self.env.real_start     # the wall clock's zero, on time.monotonic
        return [dict(kind=k, layer=layer, expert=e, start_s=a - t0, end_s=b - t0) for k, layer, e, a, b in list(events)]

    # ---- one step on the model ---------------------------------------------------------------------
    def _sync_cache(self, plan):
        """Make the device cache follow the policy's plan: evictions first (a queued copy of an
        evicted expert is dropped, as in the simulator), also of experts the plan copies again
        on demand (a prefetch of this step took their slot); returns the load plan: the plan's
        prefetches at their issue points and each layer's demand copies into the cache (demand
        copies of experts the cache will not keep stream through a staging slot)."""
        target, before = self.policy.resident, self._resident
        missing = plan.missing if plan.missing is not None else np.zeros_like(target)
        for layer, e in zip(*np.nonzero(before & ~(target & ~missing))):
            self.rt.cache.evict(int(layer), int(e))
        self._resident = target.copy()
        L = target.shape[0]
        load_plan = {"at": {}, "demand": [[] for _ in range(L)]}
        prefetched = np.zeros_like(target)
        for at, layer, e in plan.prefetch:
            if target[layer, e] and not before[layer, e]:
                prefetched[layer, e] = True
                load_plan["at"].setdefault(at, []).append((layer, e))
        for layer, e in zip(*np.nonzero(missing & target)):
            load_plan["demand"][layer].append((int(layer), int(e)))
        silent = target & ~before & ~prefetched & ~missing
        if silent.any():
            layer, e = (int(v[0]) for v in np.nonzero(silent))
            raise RuntimeError(f"policy '{self.policy.name}' made expert {e} of layer {layer} resident "
                               "without a copy in its plan (neither a demand copy nor a prefetch)")
        return load_plan

    def execute(self, now: float, work, plan) -> StepTiming:
        t_start = time.perf_counter()
        rt = self.rt
        copy_before, stall_before = rt.cache.copy_s, rt.cache.stall_s
        if plan.extra_time_s:
            time.sleep(plan.extra_time_s)   # the predictor's own time, first in the step as in the simulator
        load_plan = self._sync_cache(plan)
        routes = plan.routes
        used = np.zeros(self.policy.resident.shape, dtype=bool)
        L = used.shape[0]
        used[np.arange(L)[None, :, None], routes] = True
        segments, start = [], 0
        running = {r.index for r in self.running}
        for rid in [rid for rid in rt.kv if rid not in running]:
            rt.kv_free(rid)               # preempted: its KV is given up (recomputed when it returns)
        # KV grows with the tokens written (whole blocks), as the simulator's ledger counts it.
        for r in work.decode:
            rt.kv_alloc(r.index, r.context + 1)
            segments.append((r.index, start, 1, r.context))
            start += 1
        for r, c in work.chunks:
            if r.prefilled == 0:
                rt.kv_free(r.index)       # a recomputed (preempted) request starts over
                r.generated_ids = []
            rt.kv_alloc(r.index, r.prefilled + c)
            segments.append((r.index, start, c, r.prefilled))
            start += c
        sampled = list(range(len(work.decode))) + [s + n - 1 for (rid, s, n, pos), (r, c)
                                                   in zip(segments[len(work.decode):], work.chunks)
                                                   if r.prefilled + c >= r.prompt_tokens]
        if self.prompt_ids is None:
            # Token ids do not change time or memory: the trace row stands in for the token.
            token_ids = torch.as_tensor(work.rows % rt.spec.vocab, dtype=torch.long)
            rt.step(token_ids, segments, routes, work.batch.gates, sampled, load_plan)
        else:
            ids = [r.generated_ids[-1] for r in work.decode]
            for r, c in work.chunks:
                ids.extend(self.prompt_ids[r.index][r.prefilled:r.prefilled + c].tolist())
            next_ids, taken = rt.step(torch.as_tensor(ids, dtype=torch.long), segments, None, None, sampled,
                                      load_plan, planned=used)
            sampled_reqs = work.decode + [r for r, c in work.chunks if r.prefilled + c >= r.prompt_tokens]
            for r, t in zip(sampled_reqs, next_ids.tolist()):
                r.generated_ids.append(int(t))
            self.router_routes[work.rows] = taken.cpu().numpy()
        if self.cuda:   # the step's compute; prefetches for later steps go on on the copy stream
            torch.cuda.current_stream(rt.device).synchronize()
            rt.cache.collect_stall()
        duration = time.perf_counter() - t_start
        rt.cache.step_done()       # CUDA: the step's per-layer events (first steps only), outside its time
        return StepTiming(duration, rt.cache.copy_s - copy_before, rt.cache.stall_s - stall_before)

    def router_summary(self) -> dict:
        """Real-router replay: how the router's choices met the trace's and the cache."""
        done = self.router_routes[:, 0, 0] >= 0
        if not done.any():
            return {}
        taken, traced = self.router_routes[done], self.trace.experts[done].astype(np.int64)
        same = (taken[..., :, None] == traced[..., None, :]).any(axis=-1)
        st = self.rt.router_stats
        return dict(router_agreement=float(same.mean()), router_routes=st["routes"],
                    router_misses=st["misses"], router_reroutes=st["reroutes"],
                    router_hit_rate=1 - st["misses"] / st["routes"] if st["routes"] else 1.0)

    def _finish(self, done: list, now: float):
        super()._finish(done, now)
        for r in done:
            self.rt.kv_free(r.index)

    def memory_parts(self, plan, work) -> dict:
        """Measured: tensor bytes (CPU), or the CUDA allocator (also recorded separately). Experts:
        the cache's occupied slots plus the staging buffer the ledger reserves (top_k slots where
        the cache can be full), as the simulator's ledger counts them (and its activations)."""
        rt = self.rt
        parts = dict(dense=float(rt.dense_bytes),
                     experts=float((rt.cache.resident() + self.mem.staging_slots) * rt.cache.slot_bytes),
                     kv=float(rt.kv_bytes()),
                     activations=float(work.n_tokens * self.mem.act_per_token + work.n_sampled * self.mem.logit_bytes),
                     predictor=float(self.policy.predictor_bytes))
        if self.cuda:
            parts["cuda_allocated"] = float(torch.cuda.memory_allocated(rt.device))
            parts["cuda_reserved"] = float(torch.cuda.memory_reserved(rt.device))
        for k, v in parts.items():
            if v > self.mem.peak.get(k, 0.0):
                self.mem.peak[k] = v
        total = sum(parts[k] for k in ("dense", "experts", "kv", "activations", "predictor"))
        self.mem.peak_total = max(self.mem.peak_total, total)
        return parts
