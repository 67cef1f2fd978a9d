"""Scenario files: load, apply --set overrides, validate, resolve.

A scenario is YAML with the sections below; every key is checked and an
unknown or ill-typed one fails with the file, the key path and what is allowed.

    name: quickstart
    seed: 0
    model: mixtral-8x7b                    # preset, or {preset: ..., <field>: ...}, or all fields,
                                           # or from_trace, or {hf_config: DIR} (sim/modelsource.py)
    hardware: {preset: a100-40gb, count: 4} # or a preset name, or {profile: PROFILE.yaml}
    workload:
      trace: ../traces/samples/x.npz       # path relative to the scenario file
      synthetic: {tasks: [qa, code], requests: 100, profile: real, seed: 0}   # instead of trace
      requests: 100                        # use the first N requests (default: all)
      tasks: [qa, code]                    # keep only these tasks (default: all)
      arrival: {process: poisson, rate: 0.5}   # poisson | trace | batch (all at t=0)
      slo: {default: {ttft_s: 5, e2e_s: 120}, qa: {ttft_s: 1, tpot_s: 0.2}}
    policy: {name: on_demand, capacity: 0.6, eviction: lru, miss: fetch}
    scheduler: {name: fcfs}
    limits: {max_batch_tokens: 8192, max_running: 64, memory_utilization: 0.9, max_steps: 0,
             max_sim_time_s: 0, decode_runs: true}
    quality: {calibration: MY-CALIBRATION.yaml}   # optional; else $EMOE_QUALITY_CALIBRATION, else the package's
    # quality.sensitivity: FILE.yaml or {default: ..., tasks: ...}: the table every policy's
    # routing_fidelity_sensitive is judged by (default: the shipped one)
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import yaml

from sim.params import ParamError
from sim.workload_params import SYNTH_KEYS, WorkloadParams, check_keys  # noqa: F401 (SYNTH_KEYS: re-exported)
from traces.errors import UserError, message
from traces import yamlio


class ScenarioError(UserError):
    """A scenario that cannot run; the message names file, key and the fix."""


DEFAULTS = {
    "name": "scenario",
    "seed": 0,
    "model": None,
    "hardware": "a100-40gb",
    "workload": WorkloadParams.defaults(),
    "policy": {"name": "resident"},
    "scheduler": {"name": "fcfs"},
    "limits": {"max_batch_tokens": 8192, "max_running": 64, "memory_utilization": 0.9,
               "max_steps": 0, "max_sim_time_s": 0.0, "decode_runs": True},
}
QUALITY_KEYS = {"calibration", "sensitivity"}
TOP_KEYS = set(DEFAULTS) | {"quality"}   # `quality` only when named: default runs keep their sweep hashes
POLICY_FILES = ("predictor_file", "sensitivity", "warm_trace")   # policy keys that may name a file
LIMIT_TYPES = {"max_batch_tokens": int, "max_running": int, "memory_utilization": float, "max_steps": int,
               "max_sim_time_s": float}


def _set_path(d: dict, dotted: str, value):
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        v = cur.get(k)
        if isinstance(v, str):   # shorthand section (`policy: lru`) grows into a mapping
            v = {"name": v} if k in ("policy", "scheduler") else {"preset": v}
        cur[k] = v if isinstance(v, dict) else {}
        cur = cur[k]
    cur[keys[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """'policy.capacity=0.4' -> ('policy.capacity', 0.4); the value is parsed as YAML."""
    if "=" not in text:
        raise ScenarioError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. policy.capacity=0.4")
    key, _, raw = text.partition("=")
    try:
        value = yamlio.safe_load(raw)
    except yaml.YAMLError as e:
        raise ScenarioError(f"--set {text!r}: value is not valid YAML ({e})") from None
    if isinstance(value, str):   # YAML 1.1 reads 1e5 as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_keys(where: str, d: dict, allowed, src: str):
    try:
        check_keys(where, d, allowed)
    except ParamError as e:
        raise ScenarioError(f"{src}: {e}") from None


def load_scenario(path=None, overrides=(), data: dict | None = None) -> dict:
    """Read, override, validate; returns the resolved scenario dict (with `_base_dir`)."""
    src = str(path) if path else "<scenario>"
    if data is None:
        p = Path(path)
        if not p.exists():
            raise ScenarioError(f"scenario file '{p}' does not exist (try scenarios/quickstart.yaml)")
        try:
            data = yamlio.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ScenarioError(f"{src}: malformed YAML: {e}") from None
        base_dir = p.resolve().parent
    else:
        base_dir = Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{src}: a scenario is a mapping with sections {', '.join(DEFAULTS)}")
    data = copy.deepcopy(data)
    for ov in overrides:
        key, value = parse_override(ov) if isinstance(ov, str) else ov
        _set_path(data, key, copy.deepcopy(value))   # later overrides must not mutate the caller's values
    _check_keys("", data, TOP_KEYS, src)
    # Shorthand: `policy: resident` == `policy: {name: resident}`.
    for section in ("policy", "scheduler"):
        if isinstance(data.get(section), str):
            data[section] = {"name": data[section]}
    sc = _merge(DEFAULTS, {k: v for k, v in data.items() if k not in ("policy", "scheduler", "model", "hardware")})
    for section in ("policy", "scheduler", "model", "hardware"):
        if section in data:
            sc[section] = copy.deepcopy(data[section])
    user_w = data.get("workload") if isinstance(data.get("workload"), dict) else {}
    if isinstance(user_w.get("arrival"), dict):   # an arrival process replaces the default whole
        sc["workload"]["arrival"] = {"process": "poisson", **user_w["arrival"]}
    _calibration_from_environment(sc)
    from sim.modelsource import resolve_model   # model: from_trace | {hf_config: DIR} -> explicit fields
    sc["model"] = resolve_model(sc["model"], sc["workload"], base_dir, src)
    validate(sc, src, base_dir)
    _absolute_paths(sc, base_dir)
    sc["_base_dir"] = str(base_dir)
    return sc


def _absolute_paths(sc: dict, base_dir: Path) -> None:
    """Files named relative to the scenario file become absolute, so the resolved scenario
    written into a results directory runs again from there (`emoe run RESULTS/scenario.yaml`)."""
    def fix(section: dict, key: str):
        v = section.get(key)
        if isinstance(v, str) and v and not Path(v).is_absolute():
            section[key] = str((base_dir / v).resolve())
    fix(sc["workload"], "trace")
    if isinstance(sc["hardware"], dict):
        fix(sc["hardware"], "profile")
    for key in ("predictor_file", "sensitivity", "warm_trace"):
        fix(sc["policy"], key)
    if sc.get("quality"):
        fix(sc["quality"], "calibration")
        fix(sc["quality"], "sensitivity")


def _calibration_from_environment(sc: dict) -> None:
    """$EMOE_QUALITY_CALIBRATION stands for `quality.calibration` where the scenario names none;
    written into the resolved scenario, so the results say which file estimated their quality."""
    from sim.quality import ENV
    path = os.environ.get(ENV)
    if path and not (sc.get("quality") or {}).get("calibration"):
        p = Path(path).expanduser()
        if not p.is_file():
            raise ScenarioError(f"{ENV}='{path}' does not exist; unset it or point it at a file from "
                                "`emoe calibrate-quality`")
        sc["quality"] = {**(sc.get("quality") or {}), "calibration": str(p.resolve())}


def validate(sc: dict, src: str, base_dir: Path) -> None:
    from sim.hardware import get_hardware
    from traces.model_shape import get_model
    from sim.plugins import PluginError, known
    from sim.policies import POLICIES, policy_class
    from sim.schedulers import SCHEDULERS, scheduler_class

    if sc["model"] is None:
        raise ScenarioError(f"{src}: 'model' is required (a preset such as mixtral-8x7b, see `emoe models`)")
    try:
        get_model(sc["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise ScenarioError(f"{src}: model: {message(e)}") from None
    try:
        get_hardware(sc["hardware"], base_dir)
    except (KeyError, ValueError, TypeError, FileNotFoundError, yaml.YAMLError) as e:
        raise ScenarioError(f"{src}: hardware: {message(e)}") from None
    if not isinstance(sc["seed"], int) or isinstance(sc["seed"], bool) or sc["seed"] < 0:
        raise ScenarioError(f"{src}: seed must be a whole number >= 0, got {sc['seed']!r}")

    w = sc["workload"]
    _check_keys("workload", w, DEFAULTS["workload"], src)
    if isinstance(w.get("trace"), os.PathLike):   # the Python API: a pathlib.Path is a path too
        w["trace"] = os.fspath(w["trace"])
    try:
        WorkloadParams(**w)
    except ParamError as e:
        raise ScenarioError(f"{src}: {e}") from None
    if w["trace"] is not None:
        tp = Path(w["trace"])
        tp = tp if tp.is_absolute() else base_dir / tp
        if not tp.is_file():
            raise ScenarioError(f"{src}: workload.trace '{w['trace']}' not found (looked at {tp}); "
                                "paths are relative to the scenario file")

    for section, registry, find in (("policy", POLICIES, policy_class), ("scheduler", SCHEDULERS, scheduler_class)):
        spec = sc[section]
        if not isinstance(spec, dict) or "name" not in spec:
            raise ScenarioError(f"{src}: '{section}' needs a 'name' (one of {', '.join(known(section, registry))})")
        try:
            cls = find(spec["name"], base_dir)
        except PluginError as e:
            raise ScenarioError(f"{src}: {message(e)}") from None
        try:
            cls.Params.of({k: v for k, v in spec.items() if k != "name"})
        except (UserError, KeyError, ValueError, TypeError) as e:
            raise ScenarioError(f"{src}: {section} '{spec['name']}': {message(e)}") from None
        if section == "policy":
            _check_policy_files(spec, src, base_dir)
            from sim.policies.emoe import EmoePolicy
            own = isinstance(spec.get("predictor"), str) and spec["predictor"] not in ("emoe_a", "frequency", "perfect")
            if issubclass(cls, EmoePolicy) and not spec.get("predictor_file") and own:
                from sim.predictors import predictor_class
                try:
                    predictor_class(spec["predictor"], base_dir)    # the user's own, found now, not mid-run
                except PluginError as e:
                    raise ScenarioError(f"{src}: {message(e)}") from None

    lim = sc["limits"]
    _check_keys("limits", lim, DEFAULTS["limits"], src)
    for k, typ in LIMIT_TYPES.items():
        v = lim[k]
        if not _is_number(v) or not math.isfinite(v) or (typ is int and int(v) != v) or v < 0:
            raise ScenarioError(f"{src}: limits.{k} must be a non-negative {typ.__name__}, got {v!r}")
    if not 0 < lim["memory_utilization"] <= 1:
        raise ScenarioError(f"{src}: limits.memory_utilization must be in (0, 1], got {lim['memory_utilization']}")
    if lim["max_batch_tokens"] < 1 or lim["max_running"] < 1:
        raise ScenarioError(f"{src}: limits.max_batch_tokens and limits.max_running must be at least 1")
    if not isinstance(lim["decode_runs"], bool):
        raise ScenarioError(f"{src}: limits.decode_runs must be true or false (false: step one by one, "
                            f"same results, slower at light load and at saturation), got {lim['decode_runs']!r}")
    _check_quality(sc.get("quality"), src, base_dir)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_policy_files(spec: dict, src: str, base_dir: Path) -> None:
    """Files the policy section names exist (their contents are checked as the policy reads them)."""
    for key in POLICY_FILES:
        v = spec.get(key)
        if isinstance(v, str):
            p = Path(v).expanduser()
            p = p if p.is_absolute() else base_dir / p
            if not p.is_file():
                raise ScenarioError(f"{src}: policy.{key} '{v}' does not exist (looked at {p}); "
                                    "paths are relative to the scenario file")


def _check_quality(q, src: str, base_dir: Path) -> None:
    if q is None:
        return
    _check_keys("quality", q, QUALITY_KEYS, src)
    sens = q.get("sensitivity")
    if sens is not None and not isinstance(sens, dict):   # (a table's rows are checked against the model later)
        p = Path(str(sens)).expanduser() if isinstance(sens, str) and sens else None
        if p is None or not (p if p.is_absolute() else base_dir / p).is_file():
            raise ScenarioError(f"{src}: quality.sensitivity must be a file from `emoe sensitivity` or a mapping "
                                f"{{default: ..., tasks: ...}}, got {sens!r}; paths are relative to the scenario file")
    if "calibration" not in q:
        return
    cal = q.get("calibration")
    if not (isinstance(cal, str) and cal):
        raise ScenarioError(f"{src}: quality.calibration must name a file from `emoe calibrate-quality`, "
                            f"got {cal!r}")
    p = Path(cal).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise ScenarioError(f"{src}: quality.calibration '{cal}' does not exist (looked at {p}); "
                            "paths are relative to the scenario file")
    from sim import quality
    try:
        quality.load(p)
    except UserError as e:
        raise ScenarioError(f"{src}: quality.calibration: {e}") from None


def public(sc: dict) -> dict:
    """The resolved scenario without private keys, as written to results."""
    return {k: v for k, v in sc.items() if not k.startswith("_")}


def dump(sc: dict) -> str:
    return yaml.safe_dump(public(sc), sort_keys=False)
