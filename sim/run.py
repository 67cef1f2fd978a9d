"""Run one scenario in the simulator: scenario -> model, hardware, trace, policy,
scheduler -> engine -> metrics. `emoe run`, sweeps and notebooks all call this."""
from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from sim.engine import TIMELINE_COLUMNS, Engine
from sim.hardware import get_hardware
from sim.policies import make_policy
from sim.results import code_version, request_table, summarize, write_results
from sim.scenario import ScenarioError, dump
from sim.schedulers import make_scheduler
from sim.workload import build_requests, load_workload_trace
from traces.errors import UserError, message
from traces.model_shape import get_model


@dataclass
class RunResult:
    summary: dict
    requests: pd.DataFrame
    timeline: pd.DataFrame
    meta: dict
    scenario: dict
    trace: object = None     # written beside the results when the scenario points to it
    files: dict | None = None  # more result files, name -> text (e.g. the replay's generations)

    def write(self, out_dir) -> Path:
        return write_results(out_dir, dump(self.scenario), self.requests, self.timeline, self.summary, self.meta,
                             trace=self.trace, files=self.files)


def build(sc: dict, trace=None):
    """Everything a run needs, from a resolved scenario (also used by `emoe capacity`)."""
    model = get_model(sc["model"])
    hw = get_hardware(sc["hardware"], Path(sc.get("_base_dir", ".")))
    if trace is None:
        trace = load_workload_trace(sc, model)
    elif trace is False:   # memory-only questions (capacity) need no trace
        trace = None
    policy = scenario_policy(sc, model, trace)
    scheduler = make_scheduler(sc["scheduler"])
    return model, hw, trace, policy, scheduler


def scenario_policy(sc: dict, model, trace):
    """The scenario's policy. Building it reads the files its section names (predictor_file,
    sensitivity, warm_trace) and checks them against the model and trace: a ValueError, KeyError or
    unreadable file there is the scenario's, reported against `policy`; once built, the policy's
    errors are bugs and keep their tracebacks."""
    try:
        return make_policy(sc["policy"], model, trace, sc["seed"], Path(sc.get("_base_dir", ".")))
    except UserError:
        raise
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, yaml.YAMLError) as e:
        raise ScenarioError(f"policy '{sc['policy']['name']}': {message(e)}") from e


def run_scenario(sc: dict, trace=None, progress=None) -> RunResult:
    t0 = time.perf_counter()
    model, hw, trace, policy, scheduler = build(sc, trace)
    requests = build_requests(sc, trace)
    eng = Engine(model, hw, trace, requests, policy, scheduler, sc["limits"], progress).run()
    wall = time.perf_counter() - t0
    req = request_table(requests)
    tl = pd.DataFrame(eng.timeline, columns=list(TIMELINE_COLUMNS))
    summary = summarize(req, policy.counters(), eng.mem.peak_total, eng.mem.peak,
                        extra=dict(engine_steps=eng.steps, preemptions=eng.preemptions,
                                   budget_bytes=eng.mem.budget, kv_budget_bytes=eng.mem.kv_budget,
                                   simulated_time_s=float(eng.env.now), **scheduler.metrics()),
                        model=model.name, calibration=(sc.get("quality") or {}).get("calibration"))
    meta = dict(engine="sim", code_version=code_version(), seed=sc["seed"], wall_time_s=wall,
                engine_steps_per_s=eng.steps / wall if wall else None, stopped_early=eng.stopped_early,
                model=model.describe(), hardware=hw.__dict__)
    return RunResult(summary, req, tl, meta, sc)
