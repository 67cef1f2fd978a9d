"""The expert-management interface every policy implements, and the shared mechanics.

A policy is a plain object with no clock: an engine (the SimPy simulator or the
real-GPU replayer) hands it each step's routing and it answers which experts are
used, which must be loaded (on demand or prefetched) and which were rerouted.
Time is the engine's business; decisions are the policy's.

Copies, the same for every policy: a plan names its copies and says when they are
issued; the engine decides who waits for them (the copy rule, in sim/costmodel.py
for the simulator and replay/model.py for the replayer): a layer computes once its
experts have arrived, whoever issued the copy; a demand copy waits at most for the
copy in flight, never for queued prefetches. Demand copies are the experts a
layer uses that are not resident (issued once its router has run); prefetch
copies are explicit (issue point, layer, expert) entries, issued at step start,
as a layer starts, or once a layer's router has run, and queued in issue order.

Counting, the same for every policy:
- an *access* is one (step, layer, expert) the batch needs; it is a *hit* if
  the expert was resident when the step began and not copied during it, else a
  *miss* (it was copied during the step: on demand or by one of its prefetches);
- expert_loads = every copy issued: misses under fetch, plus the step's prefetches
  of experts it did not use (`prefetches_ahead`: for later steps, or wrong guesses);
- reroutes and gate mass kept are per (token, layer) route: a rerouted route
  lost the gate mass of the experts it could not use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MISS_MODES = ("fetch", "reroute")


def _row_sums(x: np.ndarray) -> np.ndarray:
    """(L, E) -> (L,), bools counted as ints; np.add.reduce skips ndarray.sum's Python wrapper."""
    return np.add.reduce(x, axis=1)


@dataclass
class StepBatch:
    """The tokens of one engine step and their routing from the trace."""
    step: int
    experts: np.ndarray      # (n, L, k) routed expert ids
    gates: np.ndarray        # (n, L, k) gate weights (sum to 1 per token and layer)
    probs: np.ndarray | None  # (n, L, E) full router probabilities, if the trace has them
    token_req: np.ndarray    # (n,) index into `requests`
    requests: list           # the Request objects in this step


# Issue points of prefetch copies (StepPlan.prefetch), increasing in time within a step.
STEP_START = -1


def as_layer_starts(layer: int) -> int:
    """Issued as `layer` starts (before its attention)."""
    return 2 * layer


def after_router(layer: int) -> int:
    """Issued once `layer`'s router has run, behind that layer's demand copies."""
    return 2 * layer + 1


NO_COPIES = ()


@dataclass
class StepPlan:
    counts: np.ndarray       # (L, E) tokens each expert computes (after reroutes)
    demand: np.ndarray       # (L,) experts copied on demand once layer l's router has run (layer waits)
    prefetch: tuple | list   # [(issue point, layer, expert)] copies issued ahead of need, in issue order
    staged: int              # of the demand copies, experts streamed through the staging buffer (cache full)
    extra_time_s: float = 0.0  # policy work charged to the step (e.g. predictor invocation)
    routes: np.ndarray | None = None  # (n, L, k) experts each token is computed with (after reroutes)
    missing: np.ndarray | None = None  # (L, E) the experts of the demand copies (None: no demand copy)
    streamed: np.ndarray | None = None  # (L,) of each layer's demand copies, those streamed (None: none)

    @property
    def copies(self) -> int:
        return int(self.demand.sum()) + len(self.prefetch)


@dataclass
class RunPlan:
    """T consecutive single-token decode steps of one request, planned at once (light load).

    What T calls of plan_step would have returned, stacked; only for policies whose
    single-token steps load on demand only (no prefetch, no extra time)."""
    counts: np.ndarray       # (T, L, E) tokens each expert computes
    demand: np.ndarray       # (T, L) experts loaded on demand
    resident: np.ndarray     # (T,) experts resident after each step


class ExpertPolicy:
    name = "base"
    # Parameter name -> default. check_params rejects anything else.
    PARAMS: dict = {"capacity": 1.0, "capacity_bytes": None, "miss": "fetch"}
    uses_cache = True          # False: the expert set is fixed by the policy alone

    # Light load (sim/engine.py decode runs): a class declares `decode_runs = True` when its
    # plan_decode_run gives exactly what stepping gives (whenever decode_run_ready() holds).
    # The declaration vouches for the hooks below as that class defines them, so a subclass
    # that overrides any of them without declaring again is stepped (decided once, here).
    decode_runs = False
    DECODE_RUN_HOOKS = ("plan_step", "serve", "evict_key", "touch", "_admit", "admit_prefetch", "reroute",
                        "reroute_rank", "reroute_rank_from", "_needed", "_account", "_account_run",
                        "_credit_unrerouted", "_run_counts", "_plan_reroute_run", "plan_decode_run",
                        "max_decode_loads", "decode_run_ready")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "plans_decode_runs" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: declare `decode_runs = True` (and decode_run_ready() for when) "
                            "instead of overriding plans_decode_runs")
        if "decode_runs" not in cls.__dict__ and any(h in cls.__dict__ for h in cls.DECODE_RUN_HOOKS):
            cls.decode_runs = False

    def __init__(self, model, params: dict, trace=None, seed: int = 0, base_dir=None):
        self.model = model
        self.base_dir = base_dir
        self.params = {**self.PARAMS, **params}
        self.check_params(params)
        self.trace = trace
        self.rng = np.random.default_rng(seed)
        L, E = model.n_moe_layers, model.n_experts
        self.L, self.E, self.k = L, E, model.top_k
        self.capacity = self._capacity_per_layer()
        self.resident = np.zeros((L, E), dtype=bool)
        self._layer_offset = (np.arange(L) * E)[None, :, None]   # flat (layer, expert) index base
        self._layer_idx = np.arange(L)[None, :, None]
        self._zeros_L = np.zeros(L, dtype=np.int64)
        self._expert_ids = np.broadcast_to(np.arange(E), (L, E))   # default eviction order: lowest id
        self._row_of = np.broadcast_to(np.arange(L)[:, None], (L, E))
        self.popularity = np.ones((L, E))      # routed counts seen so far (reroute fallback order)
        self.miss_mode = self.params.get("miss", "fetch")
        self.predictor_bytes = 0
        # counters
        self.hits = self.misses = self.reroutes = 0
        self.loads = self.ahead_loads = 0
        self.gate_kept = 0.0
        self.routes = 0
        # Fidelity where it matters: routes in layers the request's task is sensitive to.
        from sim.sensitivity import load_sensitivity
        self.truth_sens = load_sensitivity(None, L)
        self.sensitive_kept = 0.0
        self.sensitive_routes = 0.0
        self.initial_load()

    # ---- parameters --------------------------------------------------------
    @classmethod
    def check_params(cls, params: dict) -> None:
        unknown = set(params) - set(cls.PARAMS)
        if unknown:
            raise KeyError(f"unknown parameter(s) {sorted(unknown)}; allowed: {sorted(cls.PARAMS)}")
        p = {**cls.PARAMS, **params}
        if "capacity" in cls.PARAMS:
            c = p["capacity"]
            if not isinstance(c, (int, float)) or not 0 < c <= 1:
                raise ValueError(f"capacity must be a fraction of experts in (0, 1], got {c!r}")
        if p.get("capacity_bytes") is not None and not (isinstance(p["capacity_bytes"], (int, float))
                                                       and p["capacity_bytes"] > 0):
            raise ValueError(f"capacity_bytes must be a positive number, got {p['capacity_bytes']!r}")
        if "miss" in cls.PARAMS and p["miss"] not in MISS_MODES:
            raise ValueError(f"miss must be one of {MISS_MODES}, got {p['miss']!r}")

    def _capacity_per_layer(self) -> np.ndarray:
        """Experts per layer the cache holds (uniform over layers)."""
        if self.params.get("capacity_bytes") is not None:
            per_layer = int(self.params["capacity_bytes"] // (self.model.bytes_per_expert * self.L))
        else:
            per_layer = int(round(self.params.get("capacity", 1.0) * self.E))
        if per_layer < self.k:
            raise ValueError(f"policy '{self.name}': capacity of {per_layer} experts per layer is below "
                             f"top_k={self.k}; a layer could not compute one token. Raise the capacity "
                             f"(at least {self.k / self.E:.3f} of experts)")
        return np.full(self.L, min(per_layer, self.E), dtype=np.int64)

    def initial_load(self) -> None:
        """Experts resident before the first request (default: the first `capacity`)."""
        for layer in range(self.L):
            self.resident[layer, : self.capacity[layer]] = True

    @property
    def cache_experts(self) -> int:
        """Expert slots the policy may fill: what the memory budget reserves."""
        return int(self.capacity.sum())

    # ---- hooks (engines call these; policies override what they need) ------
    def on_arrival(self, req, now: float) -> None: ...
    def on_admit(self, req, now: float) -> None: ...
    def on_finish(self, req, now: float) -> None: ...

    def plan_step(self, batch: StepBatch) -> StepPlan:
        raise NotImplementedError

    # ---- light load: a lone request's decode steps in one call -------------
    @property
    def plans_decode_runs(self) -> bool:
        """True if plan_decode_run gives exactly what plan_step would, step by step, now."""
        return self.decode_runs and self.decode_run_ready()

    def decode_run_ready(self) -> bool:
        """For a class that declares decode_runs: whether its state allows a run now."""
        return True

    @property
    def max_decode_loads(self) -> int:
        """The most experts one single-token step can load (every routed one missing)."""
        return self.L * self.k

    def plan_decode_run(self, run: StepBatch) -> RunPlan:
        """Serve one request's next T single-token decode steps (run: a batch of T tokens,
        token t is step t), updating state and counters as T plan_step calls would.
        Policies that can vectorise their cache over steps override this and
        plans_decode_runs."""
        raise NotImplementedError

    def _plan_reroute_run(self, run: StepBatch) -> RunPlan:
        """A decode run under miss='reroute': nothing is loaded, so the resident set is fixed
        and every step's reroutes can be computed at once (the fallback ranking, when the
        trace has no router probabilities, is taken as it stands at each step)."""
        T = len(run.experts)
        counts = self._run_counts(run.experts)
        pop = self.popularity + counts.cumsum(axis=0)              # as each step reroutes
        rank = None if run.probs is not None else self.reroute_rank_from(pop)
        new, hit, rerouted = self.reroute(run, rank=rank)
        self.popularity = pop[-1]
        needed = self._run_counts(new) if rerouted.any() else counts
        used = needed > 0
        self.hits += int(np.count_nonzero(used))
        self._account(run, hit, rerouted)
        for t in range(T):
            self.touch(used[t], needed[t])
        return RunPlan(needed, np.zeros((T, self.L), dtype=np.int64), np.full(T, int(self.resident.sum())))

    def _run_counts(self, experts: np.ndarray) -> np.ndarray:
        """(T, L, E) tokens routed to each expert in each single-token step."""
        T = len(experts)
        flat = (np.arange(T)[:, None, None] * (self.L * self.E) + self._layer_offset + experts).ravel()
        return np.bincount(flat, minlength=T * self.L * self.E).reshape(T, self.L, self.E)

    def _account_run(self, experts: np.ndarray, counts: np.ndarray, miss: np.ndarray, req) -> None:
        """The counters of T single-token fetch steps (what serve + _account add up step by step)."""
        T = len(experts)
        self.popularity += counts.sum(axis=0)
        n_miss = int(np.count_nonzero(miss))
        self.hits += int(np.count_nonzero(counts)) - n_miss
        self.misses += n_miss
        self.loads += n_miss
        slots = T * self.L * self.k
        hits = slots - int(np.count_nonzero(np.take_along_axis(miss, experts.astype(np.int64), axis=2)))
        s = self._sens_sum(req)
        for _ in range(T):          # float sums in the same order as step by step
            self.sensitive_kept += s
            self.sensitive_routes += s
        self._credit_unrerouted(req, hits, slots, T * self.L)

    def _credit_unrerouted(self, req, hits: int, slots: int, n_routes: int) -> None:
        """One request's routes, none rerouted: every route keeps its whole gate mass."""
        req.hits += hits
        req.misses += slots - hits
        req.gate_kept += n_routes
        req.routes += n_routes
        self.gate_kept += n_routes
        self.routes += n_routes

    # ---- shared mechanics ----------------------------------------------------
    def _needed(self, experts: np.ndarray) -> np.ndarray:
        """(L, E) tokens routed to each expert."""
        return np.bincount((self._layer_offset + experts).ravel(), minlength=self.L * self.E).reshape(self.L, self.E)

    # Hot-path note: serve/_admit/_account run once per engine step (tens of thousands of
    # times per simulated minute at light load), so they use ndarray methods, np.add.reduce
    # and np.count_nonzero, which skip numpy's Python-level wrappers (~2x cheaper on
    # (L, E) arrays). Same arithmetic, same decisions.

    def _sens_row(self, req) -> np.ndarray:
        row = req.extra.get("s_row")
        if row is None:
            row = req.extra["s_row"] = self.truth_sens.row(req.task)
        return row

    def _sens_sum(self, req) -> float:
        total = req.extra.get("s_sum")
        if total is None:
            total = req.extra["s_sum"] = float(self._sens_row(req).sum())
        return total

    def _account(self, batch: StepBatch, hit_slots: np.ndarray, rerouted: np.ndarray | None):
        """Per-request and global token-level counters for this step."""
        if rerouted is None or hit_slots is None:
            if len(batch.requests) == 1:
                s = len(batch.token_req) * self._sens_sum(batch.requests[0])
            else:
                tok_per_req = np.bincount(batch.token_req, minlength=len(batch.requests))
                s = float(sum(n * self._sens_sum(r) for n, r in zip(tok_per_req.tolist(), batch.requests)))
            self.sensitive_kept += s
            self.sensitive_routes += s
        else:
            g = batch.gates.astype(np.float32)
            kept_tl = (g * hit_slots).sum(axis=2) / np.maximum(g.sum(axis=2), 1e-9)       # (n, L)
            S = np.stack([self._sens_row(r) for r in batch.requests])[batch.token_req]   # (n, L)
            self.sensitive_kept += float((kept_tl * S).sum())
            self.sensitive_routes += float(S.sum())
        n_req = len(batch.requests)
        if n_req == 1 and rerouted is None:   # light load: one request, nothing rerouted
            r = batch.requests[0]
            n_routes = len(batch.token_req) * self.L
            slots = n_routes * self.k
            hits = slots if hit_slots is None else int(np.count_nonzero(hit_slots))
            self._credit_unrerouted(r, hits, slots, n_routes)
            return
        if rerouted is None or hit_slots is None:   # every route served by its own experts
            kept = np.full(len(batch.token_req), float(self.L))
        else:
            g = batch.gates.astype(np.float32)
            kept = ((g * hit_slots).sum(axis=2) / np.maximum(g.sum(axis=2), 1e-9)).sum(axis=1)
        if hit_slots is None:   # nothing missed this step
            per_hit = np.bincount(batch.token_req, minlength=n_req) * (self.L * self.k)
            per_miss = np.zeros(n_req)
        else:
            per_hit = np.bincount(batch.token_req, hit_slots.sum(axis=(1, 2)), minlength=n_req)
            per_miss = np.bincount(batch.token_req, (~hit_slots).sum(axis=(1, 2)), minlength=n_req)
        per_kept = np.bincount(batch.token_req, kept, minlength=n_req)
        per_routes = np.bincount(batch.token_req, minlength=n_req) * self.L
        per_rr = np.bincount(batch.token_req, rerouted.sum(axis=1), minlength=n_req) if rerouted is not None \
            else np.zeros(n_req)
        for i, r in enumerate(batch.requests):
            r.hits += int(per_hit[i])
            r.misses += int(per_miss[i])
            r.gate_kept += float(per_kept[i])
            r.routes += int(per_routes[i])
            r.reroutes += int(per_rr[i])
        self.gate_kept += float(kept.sum(dtype=np.float64))   # float32 terms, summed in double
        self.routes += int(per_routes.sum())
        if rerouted is not None:
            self.reroutes += int(rerouted.sum())

    def reroute(self, batch: StepBatch, rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Send each route whose expert is not resident to its next-ranked resident expert.

        Ranking: the full router probabilities when the trace has them, else the
        experts' popularity seen so far (or `rank`, (n, L, E) per token). Returns
        (experts after reroute, hit slots (n, L, k), rerouted routes (n, L))."""
        ex = batch.experts
        hit = self.resident[self._layer_idx, ex]
        miss = ~hit
        rerouted = miss.any(axis=2)
        if not rerouted.any():
            return ex, hit, rerouted
        ti, li = np.nonzero(rerouted)
        sub_ex, sub_miss = ex[ti, li].astype(np.int64), miss[ti, li]            # (m, k)
        if batch.probs is not None:
            score = batch.probs[ti, li].astype(np.float32)
        else:
            score = (self.reroute_rank()[li] if rank is None else rank[ti, li]).astype(np.float32)
        score = np.where(self.resident[li], score, -np.inf)
        kept_ex = np.where(sub_miss, -1, sub_ex)
        rows = np.arange(len(ti))[:, None]
        score[np.broadcast_to(rows, kept_ex.shape)[kept_ex >= 0], kept_ex[kept_ex >= 0]] = -np.inf
        cand = np.argsort(-score, axis=1, kind="stable")                         # best resident first
        rank = np.cumsum(sub_miss, axis=1) - 1
        fill = np.take_along_axis(cand, np.maximum(rank, 0), axis=1)
        new = ex.copy()
        new[ti, li] = np.where(sub_miss, fill, sub_ex)
        return new, hit, rerouted

    def serve(self, batch: StepBatch, prefetch=NO_COPIES, fresh: np.ndarray | None = None) -> StepPlan:
        """Serve a step from the cache: reroute or fetch misses, evicting by evict_key().

        prefetch: this step's prefetch copies, already made resident by admit_prefetch, and
        fresh the (L, E) experts they bring. Its layers compute with them (and wait for them,
        by the copy rule); where the step uses them they are misses, where it does not,
        prefetches ahead."""
        ex = batch.experts
        needed = self._needed(ex)
        self.popularity += needed
        n_fresh = 0
        if self.miss_mode == "reroute":
            new, hit, rerouted = self.reroute(batch)
            if rerouted.any():
                needed = self._needed(new)
            used = needed > 0
            if fresh is not None:
                n_fresh = int(np.count_nonzero(used & fresh))
                self._count_prefetch(len(prefetch), n_fresh)
            self.hits += int(used.sum()) - n_fresh
            self._account(batch, hit, rerouted)
            self.touch(used, needed)
            return StepPlan(needed, self._zeros_L, prefetch, 0, routes=new)
        used = needed > 0
        missing = used & ~self.resident
        n_miss = int(np.count_nonzero(missing))
        if fresh is not None:
            n_fresh = int(np.count_nonzero(used & fresh))
            self._count_prefetch(len(prefetch), n_fresh)
        self.hits += int(np.count_nonzero(used)) - n_miss - n_fresh
        self.misses += n_miss
        self.loads += n_miss
        if not n_miss and not n_fresh:
            self._account(batch, None, None)
            self.touch(used, needed)
            return StepPlan(needed, self._zeros_L, prefetch, 0, routes=ex)
        held = self.resident if fresh is None else self.resident & ~fresh    # resident and not copied now
        self._account(batch, held[self._layer_idx, ex], None)
        # (demand copies never evict what this step's own prefetches just brought)
        streamed = self._admit(missing, used if fresh is None else used | fresh) if n_miss else None
        staged = int(streamed.sum()) if n_miss else 0
        self.touch(used, needed)
        return StepPlan(needed, _row_sums(missing), prefetch, staged, routes=ex, missing=missing if n_miss else None,
                        streamed=streamed if staged else None)

    def _count_prefetch(self, n_copies: int, n_used: int) -> None:
        """A step's prefetch copies: those its layers use are misses, the rest prefetches ahead."""
        self.misses += n_used
        self.loads += n_used
        self.ahead_loads += n_copies - n_used

    def admit_prefetch(self, wanted, protect: np.ndarray | None = None, only_if_better: bool = False):
        """Make each wanted (issue point, layer, expert) resident, in order, for prefetching.

        A full layer evicts its most evictable expert (evict_key) outside `protect` ((L, E):
        what the policy expects the step to use) and this step's own prefetches; with
        only_if_better, only an expert whose key is below the wanted one's. Wanted experts
        already resident, and those with nothing to evict, are skipped. Returns (the copies
        issued, in order; the (L, E) experts they bring, or None if none)."""
        copies = []
        fresh = None
        key = None
        res = self.resident
        for at, layer, e in wanted:
            if res[layer, e]:
                continue
            if fresh is None:
                fresh = np.zeros_like(res)
            if int(np.count_nonzero(res[layer])) >= self.capacity[layer]:
                cand = res[layer] & ~fresh[layer]
                if protect is not None:
                    cand &= ~protect[layer]
                if not cand.any():
                    continue
                if key is None:
                    key = self.evict_key()
                    key = self._expert_ids if key is None else key
                row = np.where(cand, key[layer], np.inf)
                victim = int(row.argmin())
                if only_if_better and row[victim] >= key[layer, e]:
                    continue
                res[layer, victim] = False
            res[layer, e] = True
            fresh[layer, e] = True
            copies.append((at, layer, e))
        if not copies:
            return NO_COPIES, None
        return copies, fresh

    def reroute_rank(self) -> np.ndarray:
        """(L, E) preference among resident experts when the trace has no router probabilities."""
        return self.reroute_rank_from(self.popularity)

    def reroute_rank_from(self, popularity: np.ndarray) -> np.ndarray:
        """reroute_rank() given the popularity counts ((L, E), or (T, L, E) for a decode run)."""
        return popularity

    def evict_key(self) -> np.ndarray | None:
        """(L, E): smaller is evicted first (LRU: last use). None: lowest expert id first."""
        return None

    def _admit(self, missing: np.ndarray, used: np.ndarray) -> np.ndarray:
        """Make `missing` resident in every layer at once, evicting experts this step does
        not use, most evictable first. What still does not fit streams through the
        staging buffer and is dropped after use; returns how many did, per layer."""
        res = self.resident
        n_want = _row_sums(missing)
        free = self.capacity - _row_sums(res)
        short = n_want - free
        if short.max() > 0:
            evictable = res & ~used
            key = self.evict_key()
            order = np.where(evictable, self._expert_ids if key is None else key, np.inf).argsort(
                axis=1, kind="stable")
            n_out = np.minimum(np.maximum(short, 0), _row_sums(evictable))
            first = self._expert_ids < n_out[:, None]      # the first n_out of each layer's order
            res[self._row_of[first], order[first]] = False
            free = free + n_out
        if (n_want <= free).all():                         # everything fits (the usual case)
            res |= missing
            return self._zeros_L
        take = missing & (missing.cumsum(axis=1) <= free[:, None])
        res |= take
        return n_want - _row_sums(take)

    def touch(self, used: np.ndarray, needed: np.ndarray) -> None:
        """Recency/frequency bookkeeping after a step (LRU/LFU override)."""

    def counters(self) -> dict:
        accesses = self.hits + self.misses
        return dict(hits=self.hits, misses=self.misses, reroutes=self.reroutes,
                    expert_loads=self.loads + self.ahead_loads, prefetches_ahead=self.ahead_loads,
                    bytes_loaded=(self.loads + self.ahead_loads) * self.model.bytes_per_expert,
                    expert_hit_rate=self.hits / accesses if accesses else 1.0,
                    routing_fidelity=self.gate_kept / self.routes if self.routes else 1.0,
                    routing_fidelity_sensitive=self.sensitive_kept / self.sensitive_routes
                    if self.sensitive_routes else 1.0)
