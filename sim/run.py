"""Run one scenario in the simulator: scenario -> model, hardware, trace, policy,
scheduler -> engine -> metrics. `emoe run`, sweeps and notebooks all call this."""
from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml

from sim.engine import Engine
from sim.hardware import get_hardware
from sim.policies import make_policy
from sim.results import code_version, summarize, write_results
from sim.scenario import ScenarioError, dump
from sim.schedulers import make_scheduler
from sim.workload import Arrivals, load_workload_trace
from traces.errors import UserError, message
from traces.model_shape import get_model


@dataclass
class RunResult:
    summary: dict
    request_log: object      # sim/resultlog.py TableLogs: held, or spilled to disk for a day of traffic
    timeline_log: object
    meta: dict
    scenario: dict
    trace: object = None     # written beside the results when the scenario points to it
    files: dict | None = None  # more result files, name -> text (e.g. the replay's generations)

    @cached_property
    def requests(self) -> pd.DataFrame:
        """The request table, in workload order (read whole into memory when first asked for)."""
        return self.request_log.frame()

    @cached_property
    def timeline(self) -> pd.DataFrame:
        """One row per engine step (read whole into memory when first asked for)."""
        return self.timeline_log.frame()

    def write(self, out_dir) -> Path:
        return write_results(out_dir, dump(self.scenario), self.request_log, self.timeline_log, self.summary,
                             self.meta, trace=self.trace, files=self.files)


class Parts(NamedTuple):
    """What a run is built from; the simulator and the replayer build it the same way."""
    model: object
    hw: object
    trace: object
    policy: object
    scheduler: object


def build(sc: dict, trace=None, model=None) -> Parts:
    """Everything a run needs, from a resolved scenario (`emoe run`, capacity, replay).
    model: the shape to run instead of the scenario's (the replayer's scaled model)."""
    model = model or get_model(sc["model"])
    hw = get_hardware(sc["hardware"], Path(sc.get("_base_dir", ".")))
    if trace is None:
        trace = load_workload_trace(sc, model)
    elif trace is False:   # memory-only questions (capacity) need no trace
        trace = None
    policy = scenario_policy(sc, model, trace)
    scheduler = make_scheduler(sc["scheduler"], Path(sc.get("_base_dir", ".")))
    return Parts(model, hw, trace, policy, scheduler)


def scenario_policy(sc: dict, model, trace):
    """The scenario's policy. Building it reads the files its section names (predictor_file,
    sensitivity, warm_trace) and checks them against the model and trace: a ValueError, KeyError or
    unreadable file there is the scenario's, reported against `policy`; once built, the policy's
    errors are bugs and keep their tracebacks."""
    base = Path(sc.get("_base_dir", "."))
    try:
        policy = make_policy(sc["policy"], model, trace, sc["seed"], base)
    except UserError:
        raise
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, yaml.YAMLError) as e:
        raise ScenarioError(f"policy '{sc['policy']['name']}': {message(e)}") from e
    judge = (sc.get("quality") or {}).get("sensitivity")
    if judge is not None:   # one table judges every policy's routing_fidelity_sensitive
        from sim.sensitivity import load_sensitivity
        try:
            policy.accounting.judge_by(load_sensitivity(judge, model.n_moe_layers, base, "quality.sensitivity"))
        except (ValueError, OSError, yaml.YAMLError) as e:
            text = message(e)
            where = "" if text.startswith("quality.sensitivity") else "quality.sensitivity: "
            raise ScenarioError(where + text) from e
    return policy


def run_scenario(sc: dict, trace=None, progress=None) -> RunResult:
    t0 = time.perf_counter()
    parts = build(sc, trace)
    eng = Engine(*parts[:2], parts.trace, Arrivals(sc, parts.trace), parts.policy, parts.scheduler, sc["limits"],
                 progress).run()
    wall = time.perf_counter() - t0
    summary, req, tl = outcome(eng, sc)
    meta = dict(engine="sim", code_version=code_version(), seed=sc["seed"], wall_time_s=wall,
                engine_steps_per_s=eng.steps / wall if wall else None, stopped_early=eng.stopped_early,
                model=parts.model.describe(), hardware=parts.hw.__dict__)
    return RunResult(summary, req, tl, meta, sc)


def _elapsed(eng: Engine) -> float:
    """The run's time when serving ended (a replay that failed midway: now)."""
    return eng.elapsed_s if eng.elapsed_s is not None else eng.clock.elapsed_s(eng.env)


def outcome(eng: Engine, sc: dict, extra: dict | None = None):
    """(summary, request table, timeline) of a finished engine, simulated or replayed, the
    tables as TableLogs. extra: the engine's own figures (the replayer's measured copies),
    before the scheduler's."""
    req, tl = eng.tables()
    figures = dict(engine_steps=eng.steps, preemptions=eng.preemptions, budget_bytes=eng.mem.budget,
                   kv_budget_bytes=eng.mem.kv_budget, simulated_time_s=float(_elapsed(eng)),
                   **(extra or {}))
    figures.update(eng.scheduler.metrics())   # e.g. the eMoE scheduler's admission estimate error
    peaks = {k: v for k, v in eng.mem.peak.items() if not k.startswith("cuda")}   # the replay keeps CUDA's apart
    counters = eng.policy.counters()
    # Prefetches the link dropped before they started (their expert evicted meanwhile) were counted
    # by the policy as it issued them (and in the timeline's expert_loads); they moved no bytes.
    dropped = eng.dropped_prefetches()
    if "prefetches_ahead" in counters:
        counters["prefetches_ahead"] -= dropped
        counters["expert_loads"] -= dropped
        counters["bytes_loaded"] = counters["expert_loads"] * eng.model.bytes_per_expert
        counters["prefetches_dropped"] = dropped
    summary = summarize(req, counters, eng.mem.peak_total, peaks, extra=figures,
                        model=eng.model.name, calibration=(sc.get("quality") or {}).get("calibration"))
    return summary, req, tl
