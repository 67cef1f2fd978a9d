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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim.params import Params
from sim.policies.accounting import Accounting
from sim.policies.cache import NO_COPIES, ExpertCache, row_sums
from sim.policies.params import MISS_MODES, CacheParams  # noqa: F401 (MISS_MODES: re-exported)
from sim.policies.reroute import Rerouter


class StepBatch:
    """The tokens of one engine step and their routing from the trace.

    gates and probs may be given as functions that read them: they are read on first use, so
    a step whose policy never looks at them (fetching, nothing rerouted) does not copy them
    out of a mapped trace (a 512-token prompt chunk's gates are 64 KB on Mixtral, its probs 4x that)."""
    __slots__ = ("step", "experts", "_gates", "_probs", "token_req", "requests")

    def __init__(self, *, step: int, experts: np.ndarray, gates, probs, token_req: np.ndarray, requests: list):
        self.step = step
        self.experts = experts       # (n, L, k) routed expert ids
        self._gates = gates          # (n, L, k) gate weights (sum to 1 per token and layer)
        self._probs = probs          # (n, L, E) full router probabilities, if the trace has them (else None)
        self.token_req = token_req   # (n,) index into `requests`
        self.requests = requests     # the Request objects in this step

    @property
    def gates(self) -> np.ndarray | None:
        if callable(self._gates):
            self._gates = self._gates()
        return self._gates

    @property
    def probs(self) -> np.ndarray | None:
        if callable(self._probs):
            self._probs = self._probs()
        return self._probs


# Issue points of prefetch copies (StepPlan.prefetch), increasing in time within a step.
STEP_START = -1


def as_layer_starts(layer: int) -> int:
    """Issued as `layer` starts (before its attention)."""
    return 2 * layer


def after_router(layer: int) -> int:
    """Issued once `layer`'s router has run, behind that layer's demand copies."""
    return 2 * layer + 1


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class RunPlan:
    """T consecutive decode steps planned at once: of one request (light load, a *decode run*),
    or of the same B requests (saturation, a *batch run*).

    What T calls of plan_step would have returned, stacked; only for policies whose
    decode steps load on demand, or prefetch only experts their own layers use one layer
    ahead (no extra time)."""
    counts: np.ndarray       # (T, L, E) tokens each expert computes
    demand: np.ndarray       # (T, L) experts loaded on demand
    resident: np.ndarray     # (T,) experts resident after each step
    # Of each step's layer l, experts prefetched as layer max(l - 1, 0) starts, all used by the
    # layer (the oracle's one-layer-ahead prefetch). None: no prefetch.
    prefetch: np.ndarray | None = None   # (T, L)
    # Batch runs (several requests a step) only: of each step's demand copies, those streamed
    # through the staging buffer (the cache full), and which experts missed. None: no such copies.
    streamed: np.ndarray | None = None   # (T, L)
    missing: np.ndarray | None = None    # (T, L, E)

    def copies(self) -> np.ndarray:
        """(T,) experts copied in each step, on demand or prefetched."""
        loads = np.add.reduce(self.demand, axis=1)
        return loads if self.prefetch is None else loads + np.add.reduce(self.prefetch, axis=1)


class ExpertPolicy:
    """A policy composes three parts, each in its own file: `cache` (residency, eviction by
    the policy's evict_key), `rerouter` (where a route to a missing expert goes) and
    `accounting` (the counters). The policy decides; they keep state."""
    name = "base"
    Params: type[Params] = CacheParams   # the policy's parameters (a frozen dataclass that checks itself)
    uses_cache = True          # False: the expert set is fixed by the policy alone
    fixed_set = False          # True: a miss fetched under miss=fetch streams through, never cached

    # Light load (sim/engine.py decode runs): a class declares `decode_runs = True` when its
    # plan_decode_run gives exactly what stepping gives (whenever decode_run_ready() holds).
    # The declaration vouches for the hooks below as that class defines them, so a subclass
    # that overrides any of them without declaring again is stepped (decided once, here).
    decode_runs = False
    # Saturation (sim/engine.py batch runs): a class that declares decode_runs may also declare
    # `batch_runs = True` when its plan_batch_run gives exactly what stepping gives for the same
    # B decoding requests (miss='fetch'); the same hooks vouch for it.
    batch_runs = False
    # A class that declares batch_runs may also declare `prefill_runs = True` when its
    # plan_batch_run takes `first`: the step that prefills the requests that just joined (their
    # whole prompts, with the others' decode tokens) before the T decode steps; the same hooks vouch.
    prefill_runs = False
    DECODE_RUN_HOOKS = ("plan_step", "serve", "evict_key", "touch", "initial_load", "reroute_rank_from",
                        "_plan_reroute_run", "_run_counts", "_needed", "plan_decode_run", "max_decode_loads",
                        "decode_run_ready", "judged_sensitivity", "fixed_set", "_account_run",
                        "plan_batch_run", "_batch_counts", "_account_batch_run", "_account_prefill", "_credit_fetched",
                        "_flat_routes", "_needed_by_request", "_capacity_per_layer",
                        # the prefetching policies' runs restate what stepping does with these
                        # (prefetch admission, a prediction's update, the look-ahead), or use them
                        # only there (on_admit, on_finish: the engine calls them either way)
                        "admit_prefetch", "_observe", "_predicted", "_predict",
                        "_update_prediction", "_top_predicted", "_would_prefetch", "_prefetches_now",
                        "_plan_run", "_steps_to_next_use")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "plans_decode_runs" in cls.__dict__ or "plans_batch_runs" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: declare `decode_runs = True` (and decode_run_ready() for when; "
                            "`batch_runs = True` for saturation) instead of overriding plans_decode_runs or "
                            "plans_batch_runs")
        if "decode_runs" not in cls.__dict__ and any(h in cls.__dict__ for h in cls.DECODE_RUN_HOOKS):
            cls.decode_runs = False
        if "batch_runs" not in cls.__dict__ and any(h in cls.__dict__ for h in cls.DECODE_RUN_HOOKS):
            cls.batch_runs = False
        if "prefill_runs" not in cls.__dict__ and any(h in cls.__dict__ for h in cls.DECODE_RUN_HOOKS):
            cls.prefill_runs = False

    def __init__(self, model, params: dict | Params, trace=None, seed: int = 0, base_dir=None):
        self.model = model
        self.base_dir = base_dir
        self.params = params if isinstance(params, self.Params) else self.Params.of(params)
        self.trace = trace
        self.rng = np.random.default_rng(seed)
        L, E = model.n_moe_layers, model.n_experts
        self.L, self.E, self.k = L, E, model.top_k
        self.cache = ExpertCache(self._capacity_per_layer(), E, fixed=self.fixed_set)
        self.rerouter = Rerouter(self.cache, self.reroute_rank_from)
        # Per (layer, route slot): the flat (layer, expert) index base. Adding it to routes viewed
        # as (tokens, L * k) is one long inner loop (broadcasting over (L, k) ran ~10x slower).
        self._route_offset = np.repeat(np.arange(L, dtype=np.int32) * E, self.k)
        self._zeros_L = np.zeros(L, dtype=np.int64)
        self.miss_mode = getattr(self.params, "miss", "fetch")
        self.predictor_bytes = 0
        self.accounting = Accounting(L, self.k, self.judged_sensitivity())
        self.initial_load()

    # ---- the cache's size --------------------------------------------------
    def _capacity_per_layer(self) -> np.ndarray:
        """Experts per layer the cache holds (uniform over layers)."""
        if self.params.capacity_bytes is not None:
            per_layer = int(self.params.capacity_bytes // (self.model.bytes_per_expert * self.L))
        else:
            per_layer = int(round(self.params.capacity * self.E))
        if per_layer < self.k:
            raise ValueError(f"policy '{self.name}': capacity of {per_layer} experts per layer is below "
                             f"top_k={self.k}; a layer could not compute one token. Raise the capacity "
                             f"(at least {self.k / self.E:.3f} of experts)")
        return np.full(self.L, min(per_layer, self.E), dtype=np.int64)

    def judged_sensitivity(self):
        """The per-task layer sensitivity that fidelity in sensitive layers is judged by."""
        from sim.sensitivity import load_sensitivity
        return load_sensitivity(None, self.L)

    def initial_load(self) -> None:
        """Experts resident before the first request (default: the first `capacity`)."""
        self.cache.fill_lowest()

    # ---- what engines read -------------------------------------------------
    @property
    def resident(self) -> np.ndarray:
        """(L, E) the experts the cache holds now."""
        return self.cache.resident

    @resident.setter
    def resident(self, value: np.ndarray) -> None:
        self.cache.resident = value

    @property
    def capacity(self) -> np.ndarray:
        """(L,) expert slots per layer."""
        return self.cache.capacity

    @property
    def cache_experts(self) -> int:
        """Expert slots the policy may fill: what the memory budget reserves."""
        return self.cache.slots

    def counters(self) -> dict:
        return self.accounting.counters(self.model.bytes_per_expert)

    # ---- hooks (engines call these; policies override what they need) ------
    def on_arrival(self, req, now: float) -> None: ...
    def on_admit(self, req, now: float) -> None: ...
    def on_finish(self, req, now: float) -> None: ...

    def plan_step(self, batch: StepBatch) -> StepPlan:
        raise NotImplementedError

    def evict_key(self, batch: StepBatch) -> np.ndarray | None:
        """(L, E) for this step: smaller is evicted first (LRU: last use). None: lowest expert id first."""
        return None

    def touch(self, used: np.ndarray, needed: np.ndarray) -> None:
        """Recency/frequency bookkeeping after a step (LRU/LFU override)."""

    def reroute_rank_from(self, popularity: np.ndarray) -> np.ndarray:
        """Preference among resident experts when the trace has no router probabilities, given
        the popularity counts ((L, E), or (T, L, E) for a decode run)."""
        return popularity

    def admit_prefetch(self, batch: StepBatch, wanted, protect: np.ndarray | None = None,
                       only_if_better: bool = False):
        """ExpertCache.admit_prefetch, evicting by this step's evict_key."""
        return self.cache.admit_prefetch(wanted, lambda: self.evict_key(batch), protect, only_if_better)

    # ---- light load: a lone request's decode steps in one call -------------
    @property
    def plans_decode_runs(self) -> bool:
        """True if plan_decode_run gives exactly what plan_step would, step by step, now."""
        return self.decode_runs and self.decode_run_ready()

    def decode_run_ready(self) -> bool:
        """For a class that declares decode_runs: whether its state allows a run now."""
        return True

    @property
    def plans_batch_runs(self) -> bool:
        """True if plan_batch_run gives exactly what plan_step would, step by step, now."""
        return self.batch_runs and self.miss_mode == "fetch" and self.plans_decode_runs

    @property
    def plans_prefill_runs(self) -> bool:
        """True if plan_batch_run also takes the prefill step before its decode steps, now."""
        return self.prefill_runs and self.plans_batch_runs

    def plan_batch_run(self, run: StepBatch, first: StepBatch | None = None) -> RunPlan | None:
        """Serve T decode steps of the same B requests (run.experts (T, B, L, k): step t, request
        b), updating state and counters as T plan_step calls would; with `first` (prefill_runs
        only), that step first, the plan's step 0 (T + 1 steps). A policy may plan only the
        first T' >= 2 of them (the engine runs those), or return None before changing anything
        (the engine steps)."""
        raise NotImplementedError

    def _batch_counts(self, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((T, L, E) tokens routed to each expert in each step of a batch run, (T, B, L, k) each
        route's flat (step, layer, expert) index) for (T, B, L, k) routes."""
        T = len(experts)
        flat = self._flat_routes(experts).reshape(T, -1) + (np.arange(T, dtype=np.int32) * (self.L * self.E))[:, None]
        return (np.bincount(flat.ravel(), minlength=T * self.L * self.E).reshape(T, self.L, self.E),
                flat.reshape(experts.shape))

    def _account_batch_run(self, run: StepBatch, counts: np.ndarray, flat: np.ndarray,
                           held: np.ndarray) -> np.ndarray:
        """The popularity and counters of a batch run served by fetching (what serve adds up step
        by step); flat: _batch_counts' route index; held (T, L, E): the experts resident as each
        step began. Returns (T, L, E) the experts each step copied on demand."""
        T, B = flat.shape[:2]
        used = counts > 0
        miss = used & ~held
        acc = self.accounting
        n_miss = int(np.count_nonzero(miss))
        acc.hits += int(np.count_nonzero(used)) - n_miss
        acc.misses += n_miss
        acc.loads += n_miss
        self.rerouter.popularity += counts.sum(axis=0)
        # route slots whose expert was held, per request: held[t, l, ex[t, b, l, j]]
        assert held.dtype == bool, held.dtype                                     # (viewed as 0/1 bytes)
        hit = held.view(np.uint8).ravel().take(flat).reshape(T, B, -1)            # (T, B, L k)
        slots = T * self.L * self.k
        hits = np.add.reduce(np.add.reduce(hit, axis=2, dtype=np.int32), axis=0).tolist()
        s = acc.sensitive_sum(run.requests)          # what each step adds (Accounting.step)
        for _ in range(T):          # float sums in the same order as step by step
            acc.sensitive_kept += s
            acc.sensitive_routes += s
        acc._credit_unrerouted(run.requests, hits, [slots] * B, [T * self.L] * B)
        return miss

    @property
    def max_decode_loads(self) -> int:
        """The most experts one single-token step can load (every routed one missing)."""
        return self.L * self.k

    def plan_decode_run(self, run: StepBatch) -> RunPlan | None:
        """Serve one request's next T single-token decode steps (run: a batch of T tokens,
        token t is step t), updating state and counters as T plan_step calls would. As
        plan_batch_run, it may plan only the first T' >= 2 of them, or return None.
        Policies that can vectorise their cache over steps override this and
        plans_decode_runs."""
        raise NotImplementedError

    def _plan_reroute_run(self, run: StepBatch) -> RunPlan:
        """A decode run under miss='reroute': nothing is loaded, so the resident set is fixed
        and every step's reroutes can be computed at once (the fallback ranking, when the
        trace has no router probabilities, is taken as it stands at each step)."""
        T = len(run.experts)
        counts = self._run_counts(run.experts)
        rr = self.rerouter
        pop = rr.popularity + counts.cumsum(axis=0)              # as each step reroutes
        rank = None if run.probs is not None else self.reroute_rank_from(pop)
        new, hit, rerouted = rr.reroute(run, rank=rank)
        rr.popularity = pop[-1]
        needed = self._run_counts(new) if rerouted.any() else counts
        used = needed > 0
        self.accounting.hits += int(np.count_nonzero(used))
        self.accounting.step(run, hit, rerouted)
        for t in range(T):
            self.touch(used[t], needed[t])
        return RunPlan(counts=needed, demand=np.zeros((T, self.L), dtype=np.int64),
                       resident=np.full(T, int(self.resident.sum())))

    def _account_run(self, experts: np.ndarray, counts: np.ndarray, miss: np.ndarray, req) -> None:
        """The popularity and counters of T single-token fetch steps."""
        self.rerouter.popularity += counts.sum(axis=0)
        self.accounting.run(experts, counts, miss, req)

    def _run_counts(self, experts: np.ndarray) -> np.ndarray:
        """(T, L, E) tokens routed to each expert in each single-token step."""
        return self._batch_counts(experts[:, None])[0]

    # ---- a step served from the cache ----------------------------------------
    def _flat_routes(self, experts: np.ndarray) -> np.ndarray:
        """(..., L, k) routes -> the same shape of flat (layer, expert) indices."""
        return (experts.reshape(-1, self.L * self.k) + self._route_offset).reshape(experts.shape)

    def _needed(self, experts: np.ndarray, flat: np.ndarray | None = None) -> np.ndarray:
        """(L, E) tokens routed to each expert (flat: the routes' _flat_routes, if at hand)."""
        flat = self._flat_routes(experts) if flat is None else flat
        return np.bincount(flat.ravel(), minlength=self.L * self.E).reshape(self.L, self.E)

    def _needed_by_request(self, batch: StepBatch, flat: np.ndarray) -> np.ndarray | None:
        """(requests, L * E) routes of each request to each expert, when that table is no
        larger than the routes themselves (a step with a prompt chunk): one count gives the
        step's needs and, where it misses, each request's hits (a dot with what is held),
        instead of a count, a lookup per route and a count per request. None otherwise (a
        decode-only step, one request). The bound also keeps the keys below flat.size, so
        they fit flat's int32."""
        n_req, LE = len(batch.requests), self.L * self.E
        if n_req == 1 or n_req * LE > flat.size:
            return None
        tokens = len(batch.token_req)
        by_req = (flat.reshape(tokens, -1) + (batch.token_req * LE).astype(flat.dtype)[:, None]).ravel()
        return np.bincount(by_req, minlength=n_req * LE).reshape(n_req, LE)

    def _credit_fetched(self, batch: StepBatch, flat: np.ndarray, by_req: np.ndarray | None, used: np.ndarray,
                        held: np.ndarray, n_miss: int, n_fresh: int) -> None:
        """The counters of a fetching step: the experts it used, n_miss copied on demand and n_fresh
        brought by its prefetches, and each request's routes to the experts held (resident and
        not copied in the step), counted by request where by_req has them."""
        acc = self.accounting
        acc.served(int(np.count_nonzero(used)), n_miss, n_fresh)
        if not n_miss and not n_fresh:
            acc.step(batch, None, None)
        elif by_req is None:
            acc.step(batch, held.ravel().take(flat), None)   # held[layer, ex], one take
        else:
            acc.step(batch, None, None, hits=by_req @ held.ravel().astype(by_req.dtype))

    def _account_prefill(self, first: StepBatch) -> tuple[np.ndarray, Callable[[np.ndarray], None]]:
        """A run's prefill step (plan_batch_run's `first`), as serve() counts it: returns its (L, E)
        counts now and a function that credits it given what was held as it began (called before
        the decode steps are counted: the float sums keep stepping's order)."""
        flat = self._flat_routes(first.experts)
        by_req = self._needed_by_request(first, flat)
        counts = self._needed(first.experts, flat) if by_req is None else \
            np.add.reduce(by_req, axis=0).reshape(self.L, self.E)

        def credit(held: np.ndarray) -> None:
            self.rerouter.popularity += counts
            used = counts > 0
            self._credit_fetched(first, flat, by_req, used, held, int(np.count_nonzero(used & ~held)), 0)
        return counts, credit

    # Hot-path note: serve runs once per engine step (tens of thousands of times per
    # simulated minute at light load), so it uses ndarray methods, np.add.reduce and
    # np.count_nonzero, which skip numpy's Python-level wrappers (~2x cheaper on (L, E)
    # arrays). Same arithmetic, same decisions.

    def serve(self, batch: StepBatch, prefetch=NO_COPIES, fresh: np.ndarray | None = None) -> StepPlan:
        """Serve a step from the cache: reroute or fetch misses, evicting by evict_key().

        prefetch: this step's prefetch copies, already made resident by admit_prefetch, and
        fresh the (L, E) experts they bring. Its layers compute with them (and wait for them,
        by the copy rule); where the step uses them they are misses, where it does not,
        prefetches ahead."""
        acc, cache = self.accounting, self.cache
        ex = batch.experts
        flat = self._flat_routes(ex)       # each route's (layer, expert), read twice below
        by_req = self._needed_by_request(batch, flat)
        needed = self._needed(ex, flat) if by_req is None else np.add.reduce(by_req, axis=0).reshape(self.L, self.E)
        self.rerouter.popularity += needed
        n_fresh = 0
        if self.miss_mode == "reroute":
            new, hit, rerouted = self.rerouter.reroute(batch)
            if rerouted.any():
                needed = self._needed(new)
            used = needed > 0
            if fresh is not None:
                n_fresh = int(np.count_nonzero(used & fresh))
                acc.prefetched(len(prefetch), n_fresh)
            acc.served(int(used.sum()), 0, n_fresh)
            acc.step(batch, hit, rerouted)
            self.touch(used, needed)
            return StepPlan(counts=needed, demand=self._zeros_L, prefetch=prefetch, staged=0, routes=new)
        used = needed > 0
        resident = cache.resident
        missing = used & ~resident
        n_miss = int(np.count_nonzero(missing))
        if fresh is not None:
            n_fresh = int(np.count_nonzero(used & fresh))
            acc.prefetched(len(prefetch), n_fresh)
        held = resident if fresh is None else resident & ~fresh    # resident and not copied now
        self._credit_fetched(batch, flat, by_req, used, held, n_miss, n_fresh)
        if not n_miss and not n_fresh:
            self.touch(used, needed)
            return StepPlan(counts=needed, demand=self._zeros_L, prefetch=prefetch, staged=0, routes=ex)
        # (demand copies never evict what this step's own prefetches just brought)
        streamed = cache.admit(missing, used if fresh is None else used | fresh,
                               lambda: self.evict_key(batch)) if n_miss else None
        staged = int(streamed.sum()) if n_miss else 0
        self.touch(used, needed)
        return StepPlan(counts=needed, demand=row_sums(missing), prefetch=prefetch, staged=staged, routes=ex,
                        missing=missing if n_miss else None, streamed=streamed if staged else None)
