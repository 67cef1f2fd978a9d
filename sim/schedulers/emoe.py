"""`emoe`: the paper's SLO-aware, task-aware admission (Algorithm 1 with Eq. 3).

The waiting queue is ordered by SLO stringency (first-token deadline, then the
end-to-end one). A request R is admitted if it fits the token and memory limits
(`fits`) and no running request S that can still meet its end-to-end SLO would
miss it because R was admitted. Eq. 3, t_S = dE + (W + n_S * G_S) * c + r_S, is
evaluated with every quantity in its own unit (seconds from the simulator's cost
model, sim/schedulers/stepcost.py), rather than one per-token c times a token count:

    t_S  = r_S + dE + P_B + steps_S * step_B                    (S's own estimate)
    t_S' = t_S + P_R + min(steps_S, G_R) * (step_B+R - step_B)   (with R admitted)

r_S: time since S arrived. dE: expert-loading latency ahead (the policy's
`expected_load_s()` when it has one - eMoE's pending prediction loads -, else the
`expert_load_s` parameter). G: tokens still to generate (the task's mean output
minus those generated; 5% of the mean once that reaches 0: `reset_share`);
steps_S = G_S plus the prefill steps S still needs beyond its first. step_B: one
decode step of the batch B (running requests and those admitted so far this
round). P_B: what the batch's pending prompt chunks add to the steps they ride in;
P_R: what R's W prompt tokens add, chunked as the engine chunks prefill
(limits.max_batch_tokens). step_B+R - step_B: the cost of R's decode token in each
step it shares with S. R's own prediction is r_R + dE + P_B + P_R + steps_R * step_B+R.

A request that can no longer meet its SLO (its own estimate already exceeds it,
late or not) is left out of the check: vetoing on its behalf would only delay
others without saving it (before, one late request serialised all admission).
Only the end-to-end SLO is checked, as in the paper. A vetoed request waits; the
next one in order may still be admitted. It runs at every engine iteration, which
covers every arrival and completion.

Correction. The cost model's compute functions leave out expert copies, whose cost
depends on the policy's cache (with an LRU cache holding 60% of Mixtral's experts,
copies are ~0.3 s of a ~0.35 s step; compute is ~0.02 s). So step_B adds the
moving average of (observed step time - the compute estimate for that step's
tokens), which also absorbs the uniform-routing assumption's error and, in the
replayer, the real clock. It is additive, not a ratio: a copy costs the same
whichever prompt chunk rides in the step, so scaling prefill compute by it would
overcharge prompts. `correction: false` drops it (`emoe run ... --set
scheduler.correction=false`); the measured error of both is in README.md.

Every admission records the predicted completion time (from arrival) of R and of
each running request checked; when a request finishes, |predicted - realised| /
realised of each of its predictions goes into `admission_estimate_error_p50/p90`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.params import ParamError, Params
from sim.schedulers.base import Scheduler
from sim.schedulers.stepcost import StepCosts


@dataclass(frozen=True)
class EmoeSchedulerParams(Params):
    per_token_s: float = 0.05    # seconds per token when no cost model is attached (a scheduler on its own)
    expert_load_s: float = 0.0   # dE when the policy does not estimate it
    smoothing: float = 0.2       # weight of the newest step in the overhead's moving average
    reset_share: float = 0.05    # G's floor, as a share of the task's mean output
    correction: bool = True      # add the observed step overhead to step estimates

    def check(self) -> None:
        super().check()
        for k in ("per_token_s", "expert_load_s", "smoothing", "reset_share"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ParamError(f"{k} must be a non-negative number, got {v!r}")
        if not isinstance(self.correction, bool):
            raise ParamError(f"correction must be true or false, got {self.correction!r}")
        if not 0 <= float(self.smoothing) <= 1:
            raise ParamError(f"smoothing must be between 0 and 1, got {self.smoothing!r}")


class EmoeScheduler(Scheduler):
    name = "emoe"
    Params = EmoeSchedulerParams

    def __init__(self, params=None):
        super().__init__(params)
        self.policy = None
        self.costs = StepCosts(per_token_s=self.params.per_token_s)
        self.overhead_s = 0.0                       # moving average: observed - estimated step time
        self._predicted: dict[int, list] = {}       # request index -> predicted completions (from arrival)
        self.errors: list[float] = []               # relative errors of finished requests' predictions
        self.held: set[int] = set()                 # requests held back at least once (a veto)
        self._seen: dict[int, tuple] = {}           # request index -> (generated, steps ahead of it)

    def attach(self, policy, cost=None, max_batch_tokens=None) -> None:
        self.policy = policy
        self.costs = StepCosts(cost, max_batch_tokens, self.params.per_token_s)

    def key(self, req, now):
        return (req.deadline("ttft_s"), req.deadline("e2e_s"), req.arrival_s, req.index)

    # ---- Eq. 3's terms --------------------------------------------------------------------
    def G(self, req) -> float:
        """Tokens req still has to generate, by the task's mean output."""
        start = req.expected_output
        return max(start - req.generated, self.params.reset_share * start)

    def expert_load_s(self) -> float:
        est = getattr(self.policy, "expected_load_s", None)
        if not callable(est):
            return float(self.params.expert_load_s)
        cost = self.costs.cost
        return float(est(cost.copy_s if cost is not None else 0.0))

    @staticmethod
    def _decode_ctx(req) -> int:
        """The context req decodes at: its prompt once prefilled, plus what it generated."""
        return req.context if not req.in_prefill else req.prompt_tokens

    def _correction(self) -> float:
        return self.overhead_s if self.params.correction else 0.0

    def batch_view(self, members: list, now: float, dE: float) -> dict:
        """Eq. 3's terms for a batch: per member (arrays) and for the batch as a whole."""
        costs = self.costs
        decoding = [r for r in members if not r.in_prefill]
        n_dec, ctx_dec = len(decoding), float(sum(r.context for r in decoding))
        ctx = float(sum(self._decode_ctx(r) for r in members))
        step = costs.decode_step_s(len(members), ctx) + self._correction()
        pending, extra = 0.0, []
        for r in members:
            s, k = costs.prefill(r.prompt_tokens - r.prefilled, r.prefilled, n_dec, ctx_dec)
            pending += s
            extra.append(max(k - 1, 0))
        G = np.array([self.G(r) for r in members], dtype=float)
        steps = G + np.array(extra, dtype=float)
        elapsed = np.array([now - r.arrival_s for r in members], dtype=float)
        slo = np.array([r.slo.get("e2e_s", math.inf) for r in members], dtype=float)
        own = elapsed + dE + pending + steps * step
        return dict(members=members, n=len(members), ctx=ctx, n_dec=n_dec, ctx_dec=ctx_dec, step=step,
                    pending=pending, steps=steps, own=own, slo=slo, dE=dE)

    def with_request(self, view: dict, req, now: float) -> tuple[np.ndarray, float]:
        """(each member's completion estimate with req admitted, req's own estimate), seconds from arrival."""
        costs = self.costs
        step_r = costs.decode_step_s(view["n"] + 1, view["ctx"] + self._decode_ctx(req)) + self._correction()
        per_step = step_r - view["step"]
        pre, k = costs.prefill(req.prompt_tokens - req.prefilled, req.prefilled, view["n_dec"], view["ctx_dec"])
        g = self.G(req)
        members = view["own"] + pre + np.minimum(view["steps"], g) * per_step
        own = (now - req.arrival_s) + view["dE"] + view["pending"] + pre + (g + max(k - 1, 0)) * step_r
        return members, own

    @staticmethod
    def vetoes(view: dict, with_r: np.ndarray) -> bool:
        """Would admitting R make a running request miss an SLO it can still meet?"""
        can_meet = view["own"] <= view["slo"]
        return bool(np.any(can_meet & (with_r > view["slo"])))

    # ---- Algorithm 1 --------------------------------------------------------------------------
    def select(self, waiting, running, now, fits):
        admitted = []
        dE = self.expert_load_s()
        view = self.batch_view(list(running), now, dE)
        for req in self.ordered(waiting, now):
            with_r, own_r = self.with_request(view, req, now)
            if self.vetoes(view, with_r):
                self.held.add(req.index)
                continue
            if not fits(req):
                break
            admitted.append(req)
            self._record(req.index, own_r)
            for s, t in zip(view["members"], with_r.tolist()):
                self._record(s.index, t)
            view = self.batch_view(view["members"] + [req], now, dE)
        return admitted

    # ---- what happened -------------------------------------------------------------------------
    def _record(self, index: int, predicted: float) -> None:
        self._predicted.setdefault(index, []).append(predicted)

    def on_step(self, running, step_s, now):
        """Learn the part of step time the compute estimate misses (copies, stalls, the real clock)."""
        a = float(self.params.smoothing)
        self.overhead_s = (1 - a) * self.overhead_s + a * (step_s - self._step_estimate(running))

    def _step_estimate(self, running) -> float:
        """The compute estimate of the step the engine just ran: its decode tokens, then prompt
        chunks in admission order up to limits.max_batch_tokens (as Engine._plan_tokens)."""
        decode = [r for r in running if not r.in_prefill]
        n_tokens = n_sampled = len(decode)
        # A decode run (Engine._decode_run) reports its steps one by one before the request's
        # progress is applied: the same (request, generated) seen again is one token further on.
        seen = {}
        for r in decode:
            g, ahead = self._seen.get(r.index, (None, 0))
            seen[r.index] = (r.generated, ahead + 1 if g == r.generated else 0)
        self._seen = seen
        attn_ctx = float(sum(r.context + seen[r.index][1] for r in decode)) + len(decode)
        kv = attn_ctx
        prefill_ctx = 0.0
        n_req = len(decode)
        budget = self.costs.chunk_size(len(decode))
        for r in running:
            if not r.in_prefill:
                continue
            left = r.prompt_tokens - r.prefilled
            c = left if budget is None else min(left, budget)
            if c <= 0:
                break
            n_tokens += c
            n_sampled += int(c == left)
            attn_ctx += c * r.prefilled + c * (c + 1) / 2
            prefill_ctx += c * r.prefilled + c * (c + 1) / 2
            kv += r.prefilled + c
            n_req += 1
            if budget is not None:
                budget -= c
        return self.costs.compute_s(n_tokens, n_sampled, attn_ctx, kv, n_req, prefill_ctx)

    def on_finish(self, req, now):
        realised = now - req.arrival_s
        for p in self._predicted.pop(req.index, ()):
            if realised > 0:
                self.errors.append(abs(p - realised) / realised)

    def metrics(self) -> dict:
        e = np.asarray(self.errors, dtype=float)
        p50, p90 = (float(np.percentile(e, 50)), float(np.percentile(e, 90))) if len(e) else (math.nan, math.nan)
        return dict(admission_estimate_error_p50=p50, admission_estimate_error_p90=p90,
                    admission_estimates=int(len(e)), requests_held_back=len(self.held))
