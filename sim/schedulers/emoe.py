"""`emoe`: the paper's SLO-aware, task-aware admission (Algorithm 1 with Eq. 3).

The waiting queue is ordered by SLO stringency (first-token deadline). A request
R is admitted if it fits the token and memory limits (`fits`) and, for every
running request S, S's expected latency with R admitted stays within S's
end-to-end SLO:

    t_S = dE + (W_R + n_S * G_S) * c + r_S

dE: the expert-loading latency ahead (from the policy when it knows it, else
`expert_load_s`); W_R: R's prompt tokens; G_S: tokens S still has to generate
(starts at the task's mean output, decremented per step, reset to 5% of the start
if it reaches 0 early); n_S: the running requests (R included) expected to finish
after S; c: the per-token latency (a moving average of observed step times);
r_S: the time S has spent since arrival. It runs at every engine iteration,
which covers every arrival and completion. A request that would break a running
one's SLO waits; the next one in order may still be admitted.
"""
from __future__ import annotations

from sim.schedulers.base import Scheduler


class EmoeScheduler(Scheduler):
    name = "emoe"
    PARAMS = {"per_token_s": 0.05, "expert_load_s": 0.0, "smoothing": 0.2, "reset_share": 0.05}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        for k, v in params.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{k} must be a non-negative number, got {v!r}")

    def __init__(self, params=None):
        super().__init__(params)
        self.c = float(self.params["per_token_s"])
        self.remaining: dict[int, float] = {}   # request index -> G (tokens still to generate)
        self.policy = None

    def attach(self, policy) -> None:
        self.policy = policy

    def key(self, req, now):
        return (req.deadline("ttft_s"), req.deadline("e2e_s"), req.arrival_s, req.index)

    def G(self, req) -> float:
        return self.remaining.get(req.index, req.expected_output)

    def expert_load_s(self) -> float:
        est = getattr(self.policy, "expected_load_s", None)
        return float(est()) if callable(est) else float(self.params["expert_load_s"])

    def expected_latency(self, s, others: list, new_prompt: int, now: float, dE: float) -> float:
        """Eq. 3 for running request s, with `others` (the batch, R included) alongside."""
        g = self.G(s)
        n_after = sum(1 for o in others if o is not s and self.G(o) >= g)
        return dE + (new_prompt + n_after * g) * self.c + (now - s.arrival_s)

    def keeps_slos(self, req, running: list, now: float) -> bool:
        batch = running + [req]
        dE = self.expert_load_s()
        for s in running:
            slo = s.slo.get("e2e_s")
            if slo is not None and self.expected_latency(s, batch, req.prompt_tokens, now, dE) > slo:
                return False
        return True

    def select(self, waiting, running, now, fits):
        admitted = []
        for req in self.ordered(waiting, now):
            if not self.keeps_slos(req, running + admitted, now):
                continue
            if not fits(req):
                break
            admitted.append(req)
            self.remaining.setdefault(req.index, req.expected_output)
        return admitted

    def on_step(self, running, step_s, now):
        a = float(self.params["smoothing"])
        self.c = (1 - a) * self.c + a * step_s
        for r in running:
            if r.in_prefill:
                continue
            start = r.expected_output
            g = self.remaining.get(r.index, start) - 1
            self.remaining[r.index] = g if g > 0 else self.params["reset_share"] * start

    def on_finish(self, req, now):
        self.remaining.pop(req.index, None)
