"""`emoe`: the eMoE policy (PAPER.md mechanisms 1-6).

- Task identification of every arriving prompt (trace label or keywords, with an
  optional mis-identification rate).
- Every `interval` prompts (p; p = 1 is eMoE-E) the predictor gives each task's
  expected expert shares f per layer, and the policy loads, per layer, the
  experts with the largest expected tokens of the coming p prompts
  (`sim.demand.coming_demand`, the same definition `emoe accuracy` uses):

      N_i = p / n * sum over tasks of (sum_j W_j + T * W_o) * s * f_i

  over the T prompts of the task among the last n <= p arrivals (W_j their prompt
  tokens, W_o the task's expected output); s is the task's sensitivity at that
  layer (skip rule: insensitive tasks do not drive loading). The set is held for
  p prompts. Unpredicted experts are evicted; the copies go over the link as
  prefetches, and the prediction's own time is charged to the next step.
- L experts per layer: `capacity` of each layer (uniform), or `per_layer:
  adaptive`, which spends the same total on the (layer, expert) pairs with the
  largest share of their layer's demand (at least top_k per layer).
- Between invocations the set is fixed: a route to a non-resident expert goes to
  its next-ranked resident one (router probabilities if the trace has them, else
  the policy's own N ranking), or is fetched with miss: fetch.

The predictor is a file from `emoe predictor train` (`predictor_file`: its fitted
parameters and per-task priors), or a kind learnt online (`predictor: emoe_a |
frequency`). Either way it predicts from the history this server observes: the
routing of the requests it has finished, per identified task (emoe_a, emoe_l and
mlp read the task's previous prompt). Online learning only sets the priors of
tasks a file has none for; a file's fitted priors stay.

Warm start (`warm_start`): `none` (default) knows nothing of the workload until the
first request finishes and fetches misses until then (the paper's "the first
prompt loads all experts", within the memory budget); `predictor` predicts from
the file's priors from the first arrival; `trace` first learns from the requests
of `warm_trace` as if this server had served them. A file's training requests and
a warm trace's requests must be disjoint from the simulated ones (refused
otherwise, unless `allow_overlap: true`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.demand import Arrival, coming_demand, invocation_due
from sim.params import ParamError
from sim.policies.base import NO_COPIES, ExpertPolicy, StepBatch, StepPlan, as_layer_starts
from sim.policies.params import CacheParams
from sim.plugins import installed
from sim.predictors import load_predictor, make_predictor
from sim.predictors.base import normalise
from sim.predictors.overlap import check_disjoint, request_digests
from sim.sensitivity import load_sensitivity
from sim.taskid import TaskIdentifier


WARM_STARTS = ("none", "predictor", "trace")


@dataclass(frozen=True)
class EmoeParams(CacheParams):
    capacity: float = 0.6
    miss: str = "reroute"
    interval: int = 40                   # p: prompts between predictor invocations
    predictor: str = "emoe_a"            # learnt online: emoe_a | frequency | perfect
    predictor_file: str | None = None    # or fitted by `emoe predictor train`
    alpha: float = 0.5
    skip: bool = True                    # insensitive tasks do not drive loading
    sensitivity: str | dict | None = None   # per-task layer sensitivity (None: the shipped table)
    task_aware: bool = True
    per_layer: str = "uniform"           # uniform | adaptive
    task_id: str = "label"               # label | keywords
    misid_rate: float = 0.0
    invoke_s: float = 0.1                # the predictor's own time per invocation
    predictor_memory_share: float = 0.005
    warm_start: str = "none"             # none | predictor | trace
    warm_trace: str | dict | None = None
    allow_overlap: bool = False

    def check(self) -> None:
        super().check()
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ParamError(f"interval must be a positive integer (prompts), got {self.interval!r}")
        own = ":" in str(self.predictor) or self.predictor in installed("predictor")   # the user's (plugins)
        if self.predictor not in ("emoe_a", "frequency", "perfect") and not own and self.predictor_file is None:
            raise ParamError(f"predictor '{self.predictor}' cannot learn online; use emoe_a, frequency or "
                             "perfect (or your own as module:Class), or give predictor_file from "
                             "`emoe predictor train`")
        if self.per_layer not in ("uniform", "adaptive"):
            raise ParamError(f"per_layer must be 'uniform' or 'adaptive', got {self.per_layer!r}")
        if self.task_id not in ("label", "keywords"):
            raise ParamError(f"task_id must be 'label' or 'keywords', got {self.task_id!r}")
        for k in ("invoke_s", "predictor_memory_share", "misid_rate", "alpha"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or v < 0:
                raise ParamError(f"{k} must be a non-negative number, got {v!r}")
        self._check_warm()

    def _check_warm(self) -> None:
        if self.warm_start not in WARM_STARTS:
            raise ParamError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {self.warm_start!r}")
        if self.warm_start == "predictor" and not self.predictor_file:
            raise ParamError("warm_start: predictor needs predictor_file (from `emoe predictor train`); "
                             "or use warm_start: trace with warm_trace")
        if (self.warm_start == "trace") != (self.warm_trace is not None):
            raise ParamError("warm_start: trace and warm_trace go together: warm_trace is a trace file (or "
                             "{synthetic: {tasks: [...], requests: N, seed: S}}) of requests served before this run")
        wt = self.warm_trace
        if isinstance(wt, dict):
            from sim.workload_params import SYNTH_KEYS
            spec = wt.get("synthetic")
            if set(wt) != {"synthetic"} or not isinstance(spec, dict) or not {"tasks", "requests"} <= set(spec) \
                    or set(spec) - SYNTH_KEYS:
                raise ParamError(f"warm_trace must be a trace path or {{synthetic: {{tasks, requests, ...}}}} with "
                                 f"keys among {', '.join(sorted(SYNTH_KEYS))}, got {wt!r}")
        elif wt is not None and not isinstance(wt, str):
            raise ParamError(f"warm_trace must be a trace path or {{synthetic: {{...}}}}, got {wt!r}")
        if not isinstance(self.allow_overlap, bool):
            raise ParamError(f"allow_overlap must be true or false, got {self.allow_overlap!r}")


class EmoePolicy(ExpertPolicy):
    name = "emoe"
    Params = EmoeParams
    HISTORY_PRIOR = 64     # online priors: mean of the task's last 64 finished requests

    def __init__(self, model, params, trace=None, seed=0, base_dir=None):
        super().__init__(model, params, trace, seed, base_dir)
        p = self.params
        # its skip rule's table (what the policy believes); fidelity is judged by the scenario's
        self.sens = load_sensitivity(p.sensitivity, self.L, self.base_dir)
        tasks = trace.tasks if trace is not None else []
        self.taskid = TaskIdentifier(tasks, p.task_id, p.misid_rate, seed)
        self.file_tasks: set = set()           # tasks whose prior a predictor file fitted
        self._slots: int | None = None         # per_layer adaptive: the expert slots all layers share
        if p.predictor_file:
            path = self._path(p.predictor_file)
            self.predictor = load_predictor(path)
            if (self.predictor.L, self.predictor.E) != (self.L, self.E):
                raise ValueError(f"predictor file is for {self.predictor.L} layers x {self.predictor.E} experts, "
                                 f"the model has {self.L} x {self.E}")
            if trace is not None:
                check_disjoint(f"predictor file '{path}'", trace, self.predictor.train_ids,
                               self.predictor.train_digests, p.allow_overlap)
            self.file_tasks = set(self.predictor.prior)
            self.online = False
        else:
            kind = p.predictor
            self.predictor = (make_predictor(kind, trace=trace) if kind == "perfect"
                              else make_predictor(kind, base_dir=base_dir))
            self.predictor.L, self.predictor.E = self.L, self.E
            if kind == "emoe_a":
                self.predictor.alpha = float(p.alpha)
            self.online = kind != "perfect"
        self.predictor_bytes = int(p.predictor_memory_share * (model.dense_bytes + model.expert_bytes_total))
        self.history: dict[str, list] = {}     # task -> finished requests' (L, E) counts, oldest first
        self.recent: deque = deque(maxlen=p.interval)   # the last p arrivals: the task mix
        self.arrivals = 0
        self.invocations = 0
        self.pending = False                   # an invocation is due at the next step
        self.demand = np.zeros((self.L, self.E))
        self._output_mean = None               # the oracle's W_o per task (from the trace)
        # Warm: something is known, so predict from the first arrival on (the oracle always is).
        self.warm = p.warm_start != "none" or (not p.predictor_file and p.predictor == "perfect")
        if p.warm_start == "trace":
            self._learn_from_trace(p.warm_trace)
        self._extra_s = 0.0
        self.last_loads = 0

    # ---- hooks ----------------------------------------------------------------------
    def on_arrival(self, req, now):
        label = req.task
        text = None
        if self.params.task_id == "keywords":
            pt = self.trace.prompt_text if self.trace is not None else None
            text = None if pt is None else str(pt[req.index])
        task = req.task_id = self.taskid.identify(label, text)
        self.recent.append(Arrival(task, req.prompt_tokens, req.expected_output, req.index))
        self.arrivals += 1
        if invocation_due(self.arrivals, self.params.interval):
            self.pending = True

    def on_finish(self, req, now):
        rows = slice(req.row0, req.row0 + req.prompt_tokens + req.output_tokens)
        counts = self._needed(self.trace.experts[rows]).astype(float)
        self._learn(req.task_id or req.task, counts)
        if not self.warm:
            self.warm = True
            self.pending = True    # first knowledge: predict now rather than wait p prompts

    # ---- what the predictor learns ------------------------------------------------------
    def _path(self, path) -> Path:
        path = Path(path)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path

    def _learn(self, task: str, counts: np.ndarray) -> None:
        """A finished request's routing: the task's history, and its online prior unless a file fitted one."""
        hist = self.history.setdefault(task, [])
        hist.append(counts)
        if task in self.file_tasks:
            return
        self.predictor.prior[task] = normalise(np.mean([normalise(h) for h in hist[-self.HISTORY_PRIOR:]], axis=0))
        if self.online:     # a file's global prior (for tasks it never saw) stays too
            self.predictor.global_prior = normalise(np.mean(list(self.predictor.prior.values()), axis=0))

    def _learn_from_trace(self, spec) -> None:
        """Warm start: the requests of `spec` (a trace path or {synthetic: ...}) as if served before."""
        from traces.format import check_matches_model, load_trace
        from traces.stats import request_counts, token_mask
        if isinstance(spec, dict):
            from traces.synth import synthesize
            s = dict(spec["synthetic"])
            warm = synthesize(self.model, s.pop("tasks"), s.pop("requests"), seed=s.pop("seed", 0), **s)
            where = f"warm_trace (synthetic, seed {spec['synthetic'].get('seed', 0)})"
        else:
            path = self._path(spec)
            if not path.exists():
                raise FileNotFoundError(f"warm_trace '{path}' does not exist; give a trace of requests served "
                                        "before this run (`emoe trace synth ... --seed S`, a seed the workload "
                                        "does not use)")
            warm = load_trace(path)
            check_matches_model(warm, self.model, str(path))
            where = f"warm_trace '{path}'"
        if self.trace is not None:
            check_disjoint(where, self.trace, warm.request_id.tolist(), request_digests(warm),
                           self.params.allow_overlap, saw="holds")
        counts = request_counts(warm, token_mask(warm, "all")).astype(float)
        for i in range(warm.n_requests):
            self._learn(str(warm.task[i]), counts[i])

    # ---- the eMoE decisions -----------------------------------------------------------
    def expected_tokens(self) -> np.ndarray:
        """(L, E) expected tokens per expert of the coming p prompts (sim.demand), by identified task."""
        def shares(task, arrivals):
            return self.predictor.predict(task, self.history.get(task, []), upcoming=[a.index for a in arrivals])

        sens = (lambda task: self.sens.row(task)) if self.params.skip else None
        window = self._oracle_window() if self.predictor.kind == "perfect" else self.recent
        return coming_demand(window, self.params.interval, (self.L, self.E), shares, sens,
                             self.params.task_aware)

    def _oracle_window(self) -> list:
        """The perfect predictor's window: the p prompts from the latest arrival on, with their
        true tasks and routing (an upper bound: it sees prompts that have not arrived)."""
        t = self.trace
        if not self.recent or t is None:
            return list(self.recent)
        if self._output_mean is None:
            self._output_mean = {task: float(t.output_tokens[t.task == task].mean()) for task in t.tasks}
        j0 = self.recent[-1].index
        return [Arrival(str(t.task[j]), int(t.prompt_tokens[j]), self._output_mean[str(t.task[j])], j)
                for j in range(j0, min(j0 + self.params.interval, t.n_requests))]

    def choose(self, N: np.ndarray) -> np.ndarray:
        """(L, E) the experts to keep resident, from expected tokens N."""
        target = self.resident.copy()
        live = N.sum(axis=1) > 0           # layers no sensitive task needs keep their experts
        order = np.argsort(-N, axis=1, kind="stable")
        if self.params.per_layer == "uniform":
            for layer in np.flatnonzero(live):
                target[layer] = False
                target[layer, order[layer, : self.capacity[layer]]] = True
            return target
        # adaptive: top_k per layer first, then the best remaining (layer, expert) shares, within
        # the same total as uniform: the slots the layers no sensitive task needs still hold are
        # spent already (they keep their experts).
        if self._slots is None:
            self._slots = int(self.capacity.sum())          # the uniform budget, fixed at the first choice
        share = normalise(N)
        budget = self._slots - int(target[~live].sum())
        target[live] = False
        rank = np.argsort(order, axis=1)
        n_live = int(live.sum())
        base = live[:, None] & (rank < min(self.k, budget // max(n_live, 1)))
        target |= base
        rest = np.where(live[:, None] & ~base, share, -1.0).ravel()
        extra = budget - int(base.sum())
        if extra > 0:
            pick = np.argsort(-rest, kind="stable")[:extra]
            pick = pick[rest[pick] >= 0]
            target.ravel()[pick] = True
        # Each layer's slots follow the allocation, so a miss fetched into a layer (miss: fetch)
        # evicts within that layer's share instead of refilling it to the uniform capacity.
        self.cache.capacity = target.sum(axis=1)
        return target

    @property
    def cache_experts(self) -> int:
        """The slots the memory budget reserves: with per_layer adaptive the layers' shares move,
        their total does not."""
        return self._slots if self._slots is not None else self.cache.slots

    def invoke(self) -> int:
        """Run the predictor, swap the expert set; returns experts copied. The swap-in copies
        (self.swap_in) are prefetches issued once the prediction is done (as the step's first
        layer starts), nearest layer first and, within a layer, most expected tokens first:
        the step's layers that use them wait for them (the copy rule)."""
        self.pending = False
        self.invocations += 1
        self.demand = self.expected_tokens()
        target = self.choose(self.demand)
        new = target & ~self.resident
        layers, experts = np.nonzero(new)
        order = np.lexsort((-self.demand[layers, experts], layers))
        self.swap_in = [(as_layer_starts(0), int(layers[i]), int(experts[i])) for i in order]
        self.swap_fresh = new
        loads = len(self.swap_in)
        self.last_loads = loads
        self.resident = target
        self._extra_s += float(self.params.invoke_s)
        return loads

    def expected_load_s(self, copy_s: float) -> float:
        """dE for the scheduler: the copies (and prediction) of an invocation that is due,
        copy_s seconds per expert copy (the scheduler's cost model)."""
        if not self.pending:
            return 0.0
        return self.last_loads * copy_s + float(self.params.invoke_s)

    def reroute_rank_from(self, popularity):
        # Predicted demand first; popularity only breaks ties.
        top = np.maximum(popularity.max(axis=(-2, -1), keepdims=True), 1)
        return self.demand + 1e-6 * popularity / top

    # Light load: between invocations nothing is loaded, so a lone request's decode steps
    # can be planned at once (ExpertPolicy._plan_reroute_run).
    decode_runs = True

    def decode_run_ready(self) -> bool:
        return self.warm and not self.pending and not self._extra_s and self.miss_mode == "reroute"

    @property
    def max_decode_loads(self) -> int:
        return 0

    def plan_decode_run(self, run: StepBatch):
        return self._plan_reroute_run(run)

    def plan_step(self, batch: StepBatch) -> StepPlan:
        if self.pending and self.warm and self.invoke():
            copies, fresh = self.swap_in, self.swap_fresh
        else:
            copies, fresh = NO_COPIES, None
        if not self.warm:           # nothing known yet: fetch what the router asks for
            mode, self.miss_mode = self.miss_mode, "fetch"
            plan = self.serve(batch)
            self.miss_mode = mode
        else:
            plan = self.serve(batch, copies, fresh)
        plan.extra_time_s += self._extra_s
        self._extra_s = 0.0
        return plan

    def counters(self) -> dict:
        c = super().counters()
        c["predictor_invocations"] = self.invocations
        return c
