"""Request schedulers: which waiting requests join the running batch, in what order.

A scheduler is a plain object with no clock: the engine passes `now` and a
`fits(request)` callback that checks (and reserves) memory and batch limits.
Admission stops at the first request in order that does not fit, as vLLM does,
so a large request is not starved by smaller ones behind it.
"""
from __future__ import annotations

from sim.params import Params


class Scheduler:
    name = "base"
    Params: type[Params] = Params     # the scheduler's parameters (a frozen dataclass that checks itself)
    # True when key() depends on neither `now` nor a request's progress (it is fixed once the
    # request arrives): the engine then keeps the waiting queue sorted by it as requests
    # arrive, and select() never re-sorts it (O(admitted x log waiting) per step).
    static_key = True

    def __init__(self, params: dict | Params | None = None):
        params = params or {}
        self.params = params if isinstance(params, self.Params) else self.Params.of(params)

    def key(self, req, now: float):
        """Sort key of the waiting queue: smaller goes first."""
        return (req.arrival_s, req.index)

    def ordered(self, waiting: list, now: float):
        return waiting if self.static_key else sorted(waiting, key=lambda r: self.key(r, now))

    def select(self, waiting: list, running: list, now: float, fits) -> list:
        admitted = []
        for req in self.ordered(waiting, now):
            if not fits(req):
                break
            admitted.append(req)
        return admitted

    # Hooks for schedulers that keep their own estimates (the eMoE scheduler).
    def attach(self, policy, cost=None, max_batch_tokens: int | None = None) -> None:
        """The engine's policy, cost model (sim/costmodel.py) and prefill chunk limit."""
    def on_step(self, running: list, step_s: float, now: float) -> None: ...
    def on_finish(self, req, now: float) -> None: ...

    def metrics(self) -> dict:
        """Extra summary keys (e.g. how good the scheduler's estimates were); none by default."""
        return {}
