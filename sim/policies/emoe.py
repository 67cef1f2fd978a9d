"""`emoe`: the eMoE policy (PAPER.md mechanisms 1-6).

- Task identification of every arriving prompt (trace label or keywords, with an
  optional mis-identification rate).
- Every `interval` prompts (p; p = 1 is eMoE-E) the predictor gives each task's
  expected expert shares f per layer, and the policy loads, per layer, the
  experts with the largest expected token counts

      N_i = sum over tasks of (sum_j W_j + T * W_o) * s * f_i

  over the T requests of the task that are waiting or running (W_j their prompt
  tokens, W_o the task's expected output); s is the task's sensitivity at that
  layer (skip rule: insensitive tasks do not drive loading). Unpredicted experts
  are evicted; the copies go over the link as prefetches, and the prediction's
  own time is charged to the next step.
- L experts per layer: `capacity` of each layer (uniform), or `per_layer:
  adaptive`, which spends the same total on the (layer, expert) pairs with the
  largest share of their layer's demand (at least top_k per layer).
- Between invocations the set is fixed: a route to a non-resident expert goes to
  its next-ranked resident one (router probabilities if the trace has them, else
  the policy's own N ranking), or is fetched with miss: fetch.

The predictor is a file from `emoe predictor train` (`predictor_file`), or a kind
learnt online from the routing of the requests this server has finished
(`predictor: emoe_a | frequency`). Until it knows anything, misses are fetched
(the paper's "the first prompt loads all experts", within the memory budget).
"""
from __future__ import annotations

import numpy as np

from sim.policies.base import ExpertPolicy, StepBatch, StepPlan
from sim.predictors import load_predictor, make_predictor
from sim.predictors.base import normalise
from sim.sensitivity import load_sensitivity
from sim.taskid import TaskIdentifier


class EmoePolicy(ExpertPolicy):
    name = "emoe"
    PARAMS = {"capacity": 0.6, "capacity_bytes": None, "miss": "reroute", "interval": 40,
              "predictor": "emoe_a", "predictor_file": None, "alpha": 0.5, "skip": True,
              "sensitivity": None, "task_aware": True, "per_layer": "uniform", "task_id": "label",
              "misid_rate": 0.0, "invoke_s": 0.1, "predictor_memory_share": 0.005}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        p = {**cls.PARAMS, **params}
        if not isinstance(p["interval"], int) or p["interval"] < 1:
            raise ValueError(f"interval must be a positive integer (prompts), got {p['interval']!r}")
        if p["predictor"] not in ("emoe_a", "frequency", "perfect") and p["predictor_file"] is None:
            raise ValueError(f"predictor '{p['predictor']}' cannot learn online; use emoe_a, frequency or "
                             "perfect, or give predictor_file from `emoe predictor train`")
        if p["per_layer"] not in ("uniform", "adaptive"):
            raise ValueError(f"per_layer must be 'uniform' or 'adaptive', got {p['per_layer']!r}")
        if p["task_id"] not in ("label", "keywords"):
            raise ValueError(f"task_id must be 'label' or 'keywords', got {p['task_id']!r}")
        for k in ("invoke_s", "predictor_memory_share", "misid_rate", "alpha"):
            if not isinstance(p[k], (int, float)) or p[k] < 0:
                raise ValueError(f"{k} must be a non-negative number, got {p[k]!r}")

    def __init__(self, model, params, trace=None, seed=0, base_dir=None):
        super().__init__(model, params, trace, seed, base_dir)
        p = self.params
        self.sens = load_sensitivity(p["sensitivity"], self.L, base_dir)
        self.truth_sens = self.sens   # fidelity in sensitive layers is judged by the same table
        tasks = trace.tasks if trace is not None else []
        self.taskid = TaskIdentifier(tasks, p["task_id"], p["misid_rate"], seed)
        if p["predictor_file"]:
            path = p["predictor_file"]
            if base_dir is not None and not str(path).startswith("/"):
                path = base_dir / path
            self.predictor = load_predictor(path)
            if (self.predictor.L, self.predictor.E) != (self.L, self.E):
                raise ValueError(f"predictor file is for {self.predictor.L} layers x {self.predictor.E} experts, "
                                 f"the model has {self.L} x {self.E}")
            self.online = False
        else:
            kind = p["predictor"]
            self.predictor = make_predictor(kind, trace=trace) if kind == "perfect" else make_predictor(kind)
            self.predictor.L, self.predictor.E = self.L, self.E
            if kind == "emoe_a":
                self.predictor.alpha = float(p["alpha"])
            self.online = kind != "perfect"
        self.predictor_bytes = int(p["predictor_memory_share"] * (model.dense_bytes + model.expert_bytes_total))
        self.history: dict[str, list] = {}     # task -> finished requests' (L, E) counts
        self.active: dict[int, object] = {}    # arrived, not finished
        self.arrivals = 0
        self.invocations = 0
        self.pending = False                   # an invocation is due at the next step
        self.demand = np.zeros((self.L, self.E))
        self.warm = not self.online or p["predictor"] == "perfect"
        self._extra_s = 0.0
        self.last_loads = 0
        self.copy_s = 0.0      # set by the engine from its cost model

    # ---- hooks ----------------------------------------------------------------------
    def on_arrival(self, req, now):
        label = req.task
        text = None
        if self.params["task_id"] == "keywords":
            pt = self.trace.prompt_text if self.trace is not None else None
            text = None if pt is None else str(pt[req.index])
        req.extra["task_id"] = self.taskid.identify(label, text)
        self.active[req.index] = req
        self.arrivals += 1
        if (self.arrivals - 1) % self.params["interval"] == 0:
            self.pending = True

    def on_finish(self, req, now):
        self.active.pop(req.index, None)
        if not self.online:
            return
        rows = slice(req.row0, req.row0 + req.prompt_tokens + req.output_tokens)
        counts = self._needed(self.trace.experts[rows]).astype(float)
        task = req.extra.get("task_id", req.task)
        self.history.setdefault(task, []).append(counts)
        hist = self.history[task]
        self.predictor.prior[task] = normalise(np.mean([normalise(h) for h in hist[-64:]], axis=0))
        self.predictor.global_prior = normalise(np.mean(list(self.predictor.prior.values()), axis=0))
        if not self.warm:
            self.warm = True
            self.pending = True    # first knowledge: predict now rather than wait p prompts

    # ---- the eMoE decisions -----------------------------------------------------------
    def expected_tokens(self) -> np.ndarray:
        """(L, E) N_i over the waiting and running requests, by identified task."""
        by_task: dict[str, list] = {}
        for r in self.active.values():
            by_task.setdefault(r.extra.get("task_id", r.task), []).append(r)
        N = np.zeros((self.L, self.E))
        for task, reqs in by_task.items():
            f = self.predictor.predict(task, self.history.get(task, []), upcoming=[r.index for r in reqs])
            if self.params["task_aware"]:
                weight = sum(r.prompt_tokens for r in reqs) + len(reqs) * reqs[0].expected_output
            else:
                weight = len(reqs)
            s = self.sens.row(task) if self.params["skip"] else np.ones(self.L)
            N += weight * s[:, None] * f
        return N

    def choose(self, N: np.ndarray) -> np.ndarray:
        """(L, E) the experts to keep resident, from expected tokens N."""
        target = self.resident.copy()
        live = N.sum(axis=1) > 0           # layers no sensitive task needs keep their experts
        order = np.argsort(-N, axis=1, kind="stable")
        if self.params["per_layer"] == "uniform":
            for layer in np.flatnonzero(live):
                target[layer] = False
                target[layer, order[layer, : self.capacity[layer]]] = True
            return target
        # adaptive: top_k per layer first, then the best remaining (layer, expert) shares.
        share = normalise(N)
        budget = int(self.capacity[live].sum())
        target[live] = False
        rank = np.argsort(order, axis=1)
        base = live[:, None] & (rank < self.k)
        target |= base
        rest = np.where(live[:, None] & ~base, share, -1.0).ravel()
        extra = budget - int(base.sum())
        if extra > 0:
            pick = np.argsort(-rest, kind="stable")[:extra]
            pick = pick[rest[pick] >= 0]
            target.ravel()[pick] = True
        return target

    def invoke(self) -> int:
        """Run the predictor, swap the expert set; returns experts copied."""
        self.pending = False
        self.invocations += 1
        self.demand = self.expected_tokens()
        target = self.choose(self.demand)
        loads = int((target & ~self.resident).sum())
        self.last_loads = loads
        self.resident = target
        self._extra_s += float(self.params["invoke_s"])
        return loads

    def expected_load_s(self) -> float:
        """dE for the scheduler: the copies (and prediction) of an invocation that is due."""
        if not self.pending:
            return 0.0
        return self.last_loads * self.copy_s + float(self.params["invoke_s"])

    def reroute_rank_from(self, popularity):
        # Predicted demand first; popularity only breaks ties.
        top = np.maximum(popularity.max(axis=(-2, -1), keepdims=True), 1)
        return self.demand + 1e-6 * popularity / top

    # Light load: between invocations nothing is loaded, so a lone request's decode steps
    # can be planned at once (ExpertPolicy._plan_reroute_run).
    @property
    def plans_decode_runs(self) -> bool:
        return self.warm and not self.pending and not self._extra_s and self.miss_mode == "reroute"

    @property
    def max_decode_loads(self) -> int:
        return 0

    def plan_decode_run(self, run: StepBatch):
        return self._plan_reroute_run(run)

    def plan_step(self, batch: StepBatch) -> StepPlan:
        ahead = 0
        if self.pending and self.warm:
            ahead = self.invoke()
        if not self.warm:           # nothing known yet: fetch what the router asks for
            mode, self.miss_mode = self.miss_mode, "fetch"
            plan = self.serve(batch)
            self.miss_mode = mode
        else:
            plan = self.serve(batch)
        plan.ahead += ahead
        self.ahead_loads += ahead
        plan.extra_time_s += self._extra_s
        self._extra_s = 0.0
        return plan

    def counters(self) -> dict:
        c = super().counters()
        c["predictor_invocations"] = self.invocations
        return c
