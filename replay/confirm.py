"""`emoe confirm`: does the simulator's prediction hold on this device?

    emoe confirm SCENARIO --device cpu|cuda [--scale N] [--profile P] [--tolerance ...] -o DIR

1. profile: measure this device for exactly the model the replay will run (the
   scenario's model at --scale, in the replay's dtype), or reuse --profile once it is
   checked to be for that model and this kind of device;
2. replay the scenario on the device with the profile as its hardware (this device's
   measured times and memory; a `memory_bytes` the scenario's hardware sets is kept:
   a budget the user chose);
3. simulate the replay's own resolved scenario (REPLAY/scenario.yaml: the model shape,
   dtype and scale that ran, the very requests, the profile), so the two sides differ
   only by the cost model;
4. compare (replay/compare.py) and give a pass/fail verdict per metric against the
   tolerances; explain the step time (where the simulated step differs from the measured).

With --replays N (N >= 2) step 2 runs N times, one replay after another: the simulation is
judged against their median; where the replays differ among themselves by more than the
tolerance, a miss within the tolerance of their interquartile band is inconclusive rather
than the simulator's (replay/compare.py, verdict).

DIR holds profile.yaml, replay/ (and replay-2/ ... with --replays), sim/, comparison.json,
comparison.md and verdict.txt.
What is confirmed is the simulator on *this* device: on a CPU, or on another GPU than the
scenario names, the verdict says how far the cost model can be trusted, not that the
scenario's own hardware would give the simulated numbers.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from replay.compare import check_comparable, compare, format_verdict, inconclusive, json_safe, passed, verdict
from replay.model import scaled_spec
from replay.profile import attention_seconds, busy_steps, run_profile, step_wall, write_profile
from replay.run import DTYPES, ReplayOOM, replay_scenario
from sim.costmodel import measured_for
from sim.hardware import get_hardware
from sim.run import run_scenario
from sim.scenario import load_scenario
from traces.errors import UserError
from traces.model_shape import get_model
from traces import yamlio

CALIBRATION_REQUESTS = 24   # the profile's step-overhead replay: a short all-at-once batch


class ConfirmError(UserError):
    """A profile that cannot stand for this replay, or options that do not fit together."""


@dataclass
class Confirmation:
    out: Path
    rows: list            # verdict rows (replay/compare.py)
    refusals: list
    warnings: list
    report: dict
    replay_error: str = ""
    log: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return passed(self.rows, self.refusals) and not self.replay_error

    @property
    def inconclusive(self) -> bool:
        """Not confirmed only because the device's replays spread more than a tolerance."""
        return inconclusive(self.rows, self.refusals) and not self.replay_error


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def replay_spec(sc: dict, scale: int, dtype_name: str):
    """The model the replay builds: the scenario's at 1/scale hidden sizes, in the replay's dtype."""
    return scaled_spec(get_model(sc["model"]), scale, torch.tensor([], dtype=DTYPES[dtype_name]).element_size())


def check_profile(profile_path, spec, device: str) -> dict:
    """A profile given with --profile must be for exactly the replayed model on this kind of device:
    otherwise the simulation falls back to the roofline, or times another machine."""
    p = Path(profile_path)
    if not p.is_file():
        raise ConfirmError(f"--profile {p}: no such file; write one with `emoe profile` or leave --profile out")
    try:
        prof = yamlio.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfirmError(f"--profile {p}: malformed YAML ({e})") from None
    if not isinstance(prof, dict) or "hardware" not in prof or not isinstance(prof.get("measured"), dict):
        raise ConfirmError(f"--profile {p}: not a profile from `emoe profile --scenario` (no measured section)")
    shape = prof["measured"].get("model", {})
    hw = type("H", (), {"measured": prof["measured"]})()
    if measured_for(hw, spec) is None or shape.get("dtype_bytes") != spec.dtype_bytes:
        raise ConfirmError(f"--profile {p} was measured for {shape.get('name')} (hidden {shape.get('hidden')}, "
                           f"{shape.get('dtype_bytes')}-byte values), the replay runs {spec.name} (hidden "
                           f"{spec.hidden}, {spec.dtype_bytes}-byte values); profile this model: leave --profile "
                           "out, or `emoe profile --scenario SCENARIO` with the same --scale and --dtype")
    dev = str(prof.get("info", {}).get("device", ""))
    if device.startswith("cuda") != (not dev.startswith("cpu")):
        raise ConfirmError(f"--profile {p} was measured on '{dev}', the replay runs on {device}; profile this device")
    if "kv_block_tokens" not in prof["measured"]:
        # the replay holds KV in blocks; without the block the simulation would count it per token
        raise ConfirmError(f"--profile {p} predates KV blocks (no measured.kv_block_tokens), so the simulation "
                           "would count KV per token against the replay's blocks; profile again (leave --profile "
                           "out, or `emoe profile --scenario SCENARIO`)")
    return prof


def calibration_scenario(sc: dict) -> dict:
    """The profile's step-overhead replay: the scenario's model, trace, policy, scheduler and
    arrival process on its first requests, under another seed (other arrival times, so the
    verdict's replay is not the calibration's). The policy's and scheduler's host work per step
    is part of the step overhead (on the 2-core development VM under load, on_demand's planning
    and copy issue cost ~3 ms a step more than resident's), and prefill steps shaped like the
    scenario's (one arriving request's chunks, not a batch of all prompts at once) give its cost
    per prefill token."""
    cal = copy.deepcopy(sc)
    cal["seed"] = sc["seed"] + 1
    w = cal["workload"]
    w["requests"] = min(w.get("requests") or CALIBRATION_REQUESTS, CALIBRATION_REQUESTS)
    return cal


def replay_hardware(sc: dict, profile_path: Path) -> dict:
    """This device, as profiled; the scenario's own memory_bytes, if it sets one, stays a budget."""
    hw = {"profile": str(profile_path)}
    if isinstance(sc["hardware"], dict) and "memory_bytes" in sc["hardware"]:
        hw["memory_bytes"] = sc["hardware"]["memory_bytes"]
    return hw


def step_breakdown(timeline: pd.DataFrame, measured: dict, n_layers: int) -> dict:
    """The replay's own steps priced by the profile's cost functions, by kind of step: where
    the simulated step time differs from the measured one. `wall` is from one step's start to
    the next (the engine's own work included, as the profile's step overhead is fitted);
    `predicted` is what the cost model charges for exactly that step (layers + step overhead);
    `stall` the measured wait for copies, which the simulator charges by its copy rule."""
    if timeline.empty:
        return {}
    a, e, st = measured["attention_s"], measured["expert_s"], measured["step_s"]
    k = measured["model"]["top_k"]
    tl = timeline
    attn = n_layers * attention_seconds(a, tl)
    experts = e["a"] * tl.active_experts + e["b"] * tl.tokens * k
    if "shared_s" in measured:
        experts = experts + n_layers * (measured["shared_s"]["a"] + measured["shared_s"]["b"] * tl.tokens)
    fixed = st["a"] + st.get("b", 0.0) * tl.sampled + st["c"] * tl.tokens   # as sim/costmodel.py fixed_s
    wall = step_wall(tl)
    busy = busy_steps(tl)   # not a step after which the engine idled until an arrival
    out = {}
    for kind, mask in (("decode", (tl.prefill_tokens == 0) & busy), ("prefill", (tl.prefill_tokens > 0) & busy)):
        if not mask.any():
            continue
        w, pred = wall[mask], (attn + experts + fixed)[mask]
        out[kind] = dict(steps=int(mask.sum()), wall_s=float(w.sum()), step_s=float(tl.step_s[mask].sum()),
                         predicted_s=float(pred.sum()), attention_s=float(attn[mask].sum()),
                         experts_s=float(experts[mask].sum()), fixed_s=float(fixed[mask].sum()),
                         stall_s=float(tl.stall_s[mask].sum()),
                         error=float((pred.sum() + tl.stall_s[mask].sum() - w.sum()) / w.sum()) if w.sum() else None,
                         median_step_error=float(np.median((pred + tl.stall_s[mask] - w) / w)))
    return out


def confirm(sc: dict, out, device: str = "cpu", scale: int = 1, dtype: str | None = None, profile=None,
            tolerances: dict | None = None, threads: int | None = None, max_copy_mb: int = 64,
            say=print, replays: int = 1) -> Confirmation:
    """threads: torch threads for the profile (the CPU replay uses the profile's, so a given
    --profile decides them). replays: how many times the scenario is replayed (the verdict
    takes their median and their spread)."""
    before = torch.get_num_threads()
    try:
        return _confirm(sc, out, device, scale, dtype, profile, tolerances, threads, max_copy_mb, say, replays)
    finally:
        torch.set_num_threads(before)   # the replay set the profile's thread count


def check_options(out: Path, device: str, scale: int, threads: int | None, replays: int = 1) -> None:
    """What would make a confirmation fail, before anything runs or is written."""
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfirmError(f"--device {device}: use cpu or cuda (cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfirmError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if not (isinstance(scale, int) and scale >= 1):
        raise ConfirmError(f"--scale must be a positive integer, got {scale}")
    if threads is not None and threads < 1:
        raise ConfirmError(f"--threads must be at least 1, got {threads}")
    if not (isinstance(replays, int) and replays >= 1):
        raise ConfirmError(f"--replays must be a positive integer, got {replays}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfirmError(f"-o {out}: exists and is not an empty directory; choose another -o (nothing was "
                           "overwritten)")


def _confirm(sc, out, device, scale, dtype, profile, tolerances, threads, max_copy_mb, say,
             replays=1) -> Confirmation:
    from replay.compare import DEFAULT_TOLERANCES
    tolerances = tolerances or dict(DEFAULT_TOLERANCES)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    out = Path(out)
    check_options(out, device, scale, threads, replays)
    spec = replay_spec(sc, scale, dtype)
    given = check_profile(profile, spec, device) if profile else None   # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = []

    def note(msg):
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        log.append(line)
        say(line)

    load_before = _load()
    host = {}   # one model's host-side experts, shared by the calibration replay and the replay
    prof_path = out / "profile.yaml"
    if given:
        prof = given
        shutil.copyfile(profile, prof_path)
        note(f"profile: {profile} (measured {prof.get('info', {}).get('measured_at')})")
    else:
        note(f"profiling {device} for {spec.name} ({dtype})")
        prof = run_profile(device, spec, DTYPES[dtype], calibration_scenario(sc), max_copy_mb << 20, scale,
                           host_experts=host, threads=threads, say=note)
        write_profile(prof, prof_path)
        note(f"profile: {prof['info']['seconds']}s, {prof['info']['threads']} threads, load "
             f"{prof['info']['load_average']}" + (f"; NOISY {prof['info']['noisy']}" if prof["info"]["noisy"] else ""))
    rsc = copy.deepcopy(sc)
    rsc["hardware"] = replay_hardware(sc, prof_path.resolve())
    get_hardware(rsc["hardware"])   # the profile reads as hardware before the replay starts
    runs = []    # (replay, its directory), one after another on the same device
    failure = None   # the replay that stopped early: which, where its results are, why
    for i in range(1, replays + 1):
        of = f" ({i} of {replays})" if replays > 1 else ""
        if i > 1:   # the last replay's model, freed before this one builds its own (CUDA's peak is per replay)
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        note(f"replaying {sc['name']} on {device}{of}")
        try:
            rp = replay_scenario(rsc, device, scale, dtype, host_experts=host)
        except ReplayOOM as e:
            if i == 1:
                raise
            failure = dict(replay=i, of=replays, dir=None, error=str(e))
            break
        d = rp.write(out / ("replay" if i == 1 else f"replay-{i}"))
        runs.append((rp, d))
        note(f"replay{of}: {rp.meta['wall_time_s']:.1f}s wall, {rp.summary['requests_completed']} requests")
        if rp.summary.get("error"):
            failure = dict(replay=i, of=replays, dir=str(d), error=rp.summary["error"])
            break                        # (the replays after it would not be compared)
    rp, rp_dir = runs[0]
    # The verdict is on the replays that completed (a stopped one's partial figures would bend the median).
    judged = [(r, d) for r, d in runs if not r.summary.get("error")] or runs[:1]
    note("simulating the replay's own scenario with the profile")
    sim = run_scenario(load_scenario(rp_dir / "scenario.yaml"))
    sim_dir = sim.write(out / "sim")
    table = compare(sim_dir, rp_dir)
    refusals, warnings = check_comparable(sim_dir, rp_dir)
    if prof["info"].get("noisy"):
        warnings.append(f"the profile's timings varied by {prof['info']['noisy']} between repeats (load "
                        f"{prof['info'].get('load_average')}): rerun on an idle machine")
    if failure and replays > 1:
        warnings.append(f"replay {failure['replay']} of {replays} stopped early ({failure['error']}): the verdict "
                        + (f"is on replays 1-{len(judged)}" if len(judged) > 1 else "is on replay 1 alone"))
    rows = verdict(table, tolerances, rp.summary, [r.summary for r, _ in judged] if len(judged) > 1 else None)
    load_after = _load()
    breakdown = step_breakdown(rp.timeline, prof["measured"], spec.n_moe_layers)
    if len(runs) > 1:   # each replay's steps priced by the same profile: how far the device moved between them
        for i, (r, _) in enumerate(runs[1:], 2):
            breakdown.update({f"{k} (replay {i})": v for k, v in
                              step_breakdown(r.timeline, prof["measured"], spec.n_moe_layers).items()})
    text = format_verdict(rows, refusals, warnings)
    report = dict(scenario=sc["name"], device=rp.meta["device_name"], dtype=dtype, scale=scale,
                  model=spec.name, profile=str(prof_path), profile_given=str(profile) if profile else None,
                  threads=prof["measured"].get("threads"), tolerances=tolerances,
                  load_average_before=load_before, load_average_after=load_after,
                  seconds=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  replays=[str(d) for _, d in runs], judged_replays=[str(d) for _, d in judged],
                  verdict=rows, passed=passed(rows, refusals) and not failure,
                  inconclusive=inconclusive(rows, refusals) and not failure,
                  refusals=refusals, warnings=warnings, replay_error=failure["error"] if failure else None,
                  replay_failed=failure,
                  step_time=breakdown, sim_steps_s=float(sim.timeline.step_s.sum()),
                  replay_steps_s=float(rp.timeline.step_s.sum()),
                  comparison=json.loads(table.reset_index().to_json(orient="records")))
    (out / "comparison.json").write_text(json.dumps(json_safe(report), indent=2, default=str))
    (out / "verdict.txt").write_text(text + "\n")
    (out / "comparison.md").write_text(_markdown(report, table, text, log))
    note(f"wrote {out / 'comparison.md'}")
    return Confirmation(out, rows, refusals, warnings, report, failure["error"] if failure else "", log)


def _markdown(report: dict, table: pd.DataFrame, verdict_text: str, log: list) -> str:
    lines = [f"# emoe confirm: {report['scenario']} on {report['device']}", "",
             f"{report['model']} ({report['dtype']}, scale 1/{report['scale']}), {report['threads']} threads, "
             f"{report['date']}; machine load {report['load_average_before']} before, "
             f"{report['load_average_after']} after", "", "## Verdict", "", "```", verdict_text, "```", ""]
    if len(report["judged_replays"]) > 1:
        lines += [f"The verdict is against the median of {len(report['judged_replays'])} replays of the same "
                  "scenario, one after another (`replays`, `replay_band` and `replay_spread` in "
                  "comparison.json); the table below is the first replay's.", ""]
    lines += ["## Simulated vs replayed", "", "| metric | sim | replay | error |", "|---|---|---|---|"]
    for m, r in table.iterrows():
        if r.sim is None or r.replay is None or pd.isna(r.sim) or pd.isna(r.replay):
            continue
        err = "" if pd.isna(r.rel_error) else f"{r.rel_error:+.1%}"
        lines.append(f"| {m} | {r.sim:.4g} | {r.replay:.4g} | {err} |")
    if report["step_time"]:
        lines += ["", "## Step time: the replay's steps priced by the profile", "",
                  "| steps | n | wall s | predicted s (attention + experts + fixed) | stall s | error |",
                  "|---|---|---|---|---|---|"]
        for kind, b in report["step_time"].items():
            lines.append(f"| {kind} | {b['steps']} | {b['wall_s']:.3f} | {b['predicted_s']:.3f} ("
                         f"{b['attention_s']:.3f} + {b['experts_s']:.3f} + {b['fixed_s']:.3f}) | {b['stall_s']:.3f} | "
                         f"{b['error']:+.1%} |")
    return "\n".join(lines + ["", "```", *log, "```", ""])
