"""From a scenario's workload section to the requests an engine serves."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sim.request import Request
from sim.scenario import ScenarioError
from traces.errors import UserError, message
from traces.format import Trace, check_matches_model, load_trace


def load_workload_trace(sc: dict, model, lazy: bool = True) -> Trace:
    """The scenario's requests. A synthetic workload's routing is generated as the engine reads
    it (traces/lazy_trace.py: same rows as synthesize's), unless lazy=False."""
    w = sc["workload"]
    if w["trace"] is not None:
        p = Path(w["trace"])
        if not p.is_absolute():
            p = Path(sc.get("_base_dir", ".")) / p
        trace = load_trace(p)
        check_matches_model(trace, model, str(p))
    else:
        trace = _synthetic(sc, model, lazy)
    if w["tasks"] is not None:
        unknown = sorted(set(w["tasks"]) - set(trace.tasks))
        if unknown:
            raise ScenarioError(f"workload.tasks {unknown} not in the trace (it has {trace.tasks})")
        # a lazy trace's subset is in memory: the chosen tasks' requests, generated once
        trace = trace.subset(np.flatnonzero(np.isin(trace.task, w["tasks"])))
    if w["requests"] is not None and w["requests"] < trace.n_requests:
        trace = trace.subset(np.arange(w["requests"]))
    return trace


def _synthetic(sc: dict, model, lazy: bool) -> Trace:
    from traces.lazy_trace import lazy_synthesize
    from traces.synth import synthesize
    w = sc["workload"]
    s = dict(w["synthetic"])
    args = (model, s.pop("tasks"), s.pop("requests"))
    try:
        if not lazy:
            return synthesize(*args, seed=s.pop("seed", sc["seed"]), **s)
        # the first `workload.requests` only (none of the rest is generated) unless tasks are picked first
        first = w["requests"] if w["tasks"] is None else None
        return lazy_synthesize(*args, first=first, seed=s.pop("seed", sc["seed"]), **s)
    except UserError as e:   # synthesize's checks of the section's values (tasks, requests, profile)
        raise ScenarioError(f"workload.synthetic: {message(e)}") from None


def arrival_times(sc: dict, trace: Trace) -> np.ndarray:
    arr = sc["workload"]["arrival"]
    n = trace.n_requests
    if arr["process"] == "batch":
        return np.zeros(n)
    if arr["process"] == "trace":
        if trace.arrival_s is None or np.isnan(trace.arrival_s).any():
            raise ScenarioError("workload.arrival.process is 'trace' but the trace has no arrival times; "
                             "use {process: poisson, rate: R} or synthesise with --rate")
        t = (trace.arrival_s - trace.arrival_s.min()) * float(arr.get("time_scale", 1.0))
        return t
    # Poisson: its own stream, so changing the policy never changes arrivals.
    rng = np.random.default_rng([sc["seed"], 0xA11])
    return np.cumsum(rng.exponential(1.0 / arr["rate"], n))


def slo_for(sc: dict, task: str) -> dict:
    slo = sc["workload"]["slo"]
    return {**slo.get("default", {}), **slo.get(task, {})}


class Arrivals:
    """The workload's requests in arrival order (ties by index), each Request built as it
    arrives: a day of traffic cannot hold a million of them at once."""
    in_arrival_order = True   # what the engine iterates as is

    def __init__(self, sc: dict, trace: Trace):
        self.trace = trace
        self.arrival_s = arrival_times(sc, trace)
        # What a server may know of a task before generating: its mean output length.
        tasks = trace.tasks
        self.expected = {t: float(trace.output_tokens[trace.task == t].mean()) for t in tasks}
        self.slos = {t: slo_for(sc, t) for t in tasks}   # one dict per task, shared by its requests
        self.names = {t: t for t in tasks}               # one string per task, shared by its requests

    def __len__(self) -> int:
        return self.trace.n_requests

    @functools.cached_property
    def _order(self) -> np.ndarray | range:
        """Request indices in arrival order, ties by index (read by both methods below). Arrivals
        already in that order (all at once, Poisson) need no index array: a range, not 8 bytes
        a request."""
        a = self.arrival_s
        if len(a) < 2 or bool((a[1:] >= a[:-1]).all()):
            return range(len(a))
        return np.lexsort((np.arange(len(self)), a))

    def __iter__(self):
        return (self.request(int(i)) for i in self._order)

    def times_in_order(self) -> np.ndarray:
        """Arrival times in the order __iter__ yields the requests: an engine can count
        arrivals without building them (sim/engine.py, the lazy queue)."""
        return self.arrival_s if isinstance(self._order, range) else self.arrival_s[self._order]

    def request(self, i: int) -> Request:
        t = self.trace
        task = self.names[str(t.task[i])]
        p, o = int(t.prompt_tokens[i]), int(t.output_tokens[i])
        if p == 0:   # decode-only traces: the first routed token stands in for the prompt
            p, o = 1, o - 1
        return Request(index=i, rid=str(t.request_id[i]), task=task, prompt_tokens=p, output_tokens=max(o, 1),
                       row0=int(t.offsets[i]), arrival_s=float(self.arrival_s[i]), slo=self.slos[task],
                       expected_output=self.expected[task])


def build_requests(sc: dict, trace: Trace) -> list[Request]:
    """Every request at once, in workload order (the replayer keeps them for their generations)."""
    a = Arrivals(sc, trace)
    return [a.request(i) for i in range(len(a))]
