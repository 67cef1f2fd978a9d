"""The scenario's workload section as typed parameters that check themselves.

Which requests (a trace file or a synthetic one, optionally the first N or some
tasks only), when they arrive, and their SLOs. Errors name the key path under
`workload`; the scenario adds its file. Whether the trace file exists is the
scenario's check (paths are relative to the scenario file).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sim.params import ParamError, Params, is_number

ARRIVALS = {"poisson": {"process", "rate"}, "trace": {"process", "time_scale"}, "batch": {"process"}}
SLO_KEYS = {"ttft_s", "tpot_s", "e2e_s"}
SYNTH_KEYS = {"tasks", "requests", "profile", "seed", "prompt_mean", "output_mean", "task_weights"}


def check_keys(where: str, d, allowed) -> None:
    """d is a mapping whose keys are among `allowed` (ParamError naming the key path otherwise)."""
    if not isinstance(d, dict):
        raise ParamError(f"'{where}' must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ParamError(f"unknown key(s) {', '.join(where + '.' + u if where else u for u in unknown)}; "
                         f"allowed under '{where or 'top level'}': {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class WorkloadParams(Params):
    trace: str | None = None            # a .npz path, relative to the scenario file
    synthetic: dict | None = None       # or {tasks: [...], requests: N, ...} (traces/synth.py)
    requests: int | None = None         # the first N requests (None: all)
    tasks: list | None = None           # only these tasks (None: all)
    arrival: dict = field(default_factory=lambda: {"process": "poisson", "rate": 0.5})
    slo: dict = field(default_factory=lambda: {"default": {"ttft_s": 10.0, "e2e_s": 300.0}})

    def check(self) -> None:
        super().check()
        if (self.trace is None) == (self.synthetic is None):
            raise ParamError("workload needs exactly one of 'trace' (a .npz path) or 'synthetic' "
                             "({tasks: [...], requests: N})")
        if self.trace is not None and not (isinstance(self.trace, str) and self.trace):
            raise ParamError(f"workload.trace must be the path of a trace (.npz), got {self.trace!r}")
        if self.synthetic is not None:
            _check_synthetic(self.synthetic)
        # a bool is an int to Python; `requests: true` is a mistake, not one request
        if self.requests is not None and (not is_number(self.requests) or not isinstance(self.requests, int)
                                          or self.requests < 1):
            raise ParamError(f"workload.requests must be a positive integer, got {self.requests!r}")
        if self.tasks is not None and not (isinstance(self.tasks, list) and self.tasks
                                           and all(isinstance(t, str) for t in self.tasks)):
            raise ParamError("workload.tasks must be a non-empty list of task names")
        arr = self.arrival
        if not isinstance(arr, dict) or not isinstance(arr.get("process"), str) or arr["process"] not in ARRIVALS:
            raise ParamError(f"workload.arrival.process must be one of {', '.join(ARRIVALS)}")
        check_keys("workload.arrival", arr, ARRIVALS[arr["process"]])
        if arr["process"] == "poisson" and not (isinstance(arr.get("rate"), (int, float)) and arr["rate"] > 0):
            raise ParamError(f"workload.arrival.rate must be a positive number (requests/s), got {arr.get('rate')!r}")
        if not isinstance(self.slo, dict):
            raise ParamError("workload.slo must map task names (or 'default') to targets")
        for task, targets in self.slo.items():
            check_keys(f"workload.slo.{task}", targets, SLO_KEYS)
            for k, v in targets.items():
                if not (isinstance(v, (int, float)) and v > 0):
                    raise ParamError(f"workload.slo.{task}.{k} must be a positive number of seconds")


def _check_synthetic(syn) -> None:
    check_keys("workload.synthetic", syn, SYNTH_KEYS)
    if "tasks" not in syn or "requests" not in syn:
        raise ParamError("workload.synthetic needs 'tasks' and 'requests'")
    tasks = syn["tasks"]
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise ParamError(f"workload.synthetic.tasks must be a non-empty list of task names, got {tasks!r}")
    if not (isinstance(syn["requests"], int) and not isinstance(syn["requests"], bool) and syn["requests"] >= 1):
        raise ParamError(f"workload.synthetic.requests must be a positive integer, got {syn['requests']!r}")
    if "seed" in syn and not (isinstance(syn["seed"], int) and not isinstance(syn["seed"], bool)):
        raise ParamError(f"workload.synthetic.seed must be an integer, got {syn['seed']!r}")
    if "profile" in syn and not isinstance(syn["profile"], str):
        raise ParamError(f"workload.synthetic.profile must be a profile name (real, paper), got {syn['profile']!r}")
    for k in ("prompt_mean", "output_mean"):
        if syn.get(k) is not None and not (is_number(syn[k]) and syn[k] > 0):
            raise ParamError(f"workload.synthetic.{k} must be a positive number of tokens, got {syn[k]!r}")
    tw = syn.get("task_weights")
    if tw is not None and not (isinstance(tw, list) and len(tw) == len(tasks)
                               and all(is_number(x) and x >= 0 for x in tw) and sum(tw) > 0):
        raise ParamError(f"workload.synthetic.task_weights must be one non-negative number per task "
                         f"(not all zero), got {tw!r}")
