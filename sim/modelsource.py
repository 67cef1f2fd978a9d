"""Where a scenario's model shape comes from, besides a preset or explicit fields:

    model: from_trace                      # the shape `emoe capture` recorded in workload.trace
    model: {from_trace: true, dtype_bytes: 4}          # ... with fields overridden
    model: {hf_config: CHECKPOINT_DIR}     # a Hugging Face checkpoint's config.json (relative
                                           # to the scenario file), optionally with overrides

Both are resolved once, when the scenario loads, into explicit fields: results, sweep
points and `emoe choose` files record the shape that ran, and nothing downstream needs
to know where it came from. Reading the trace's meta does not load its routing arrays.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from sim.scenario import ScenarioError
from traces.errors import UserError, message

FROM_TRACE = "from_trace"


def is_sourced(model) -> bool:
    """Whether a scenario's model entry names a source to resolve (trace or checkpoint)."""
    if model == FROM_TRACE:
        return True
    return isinstance(model, dict) and (model.get(FROM_TRACE) is True or model.get("preset") == FROM_TRACE
                                        or "hf_config" in model)


def resolve_model(model, workload: dict, base_dir: Path, src: str):
    """The model entry with a trace or checkpoint source replaced by its explicit fields;
    any other entry unchanged (presets and explicit fields are checked by validation)."""
    if not is_sourced(model):
        return model
    over = {} if model == FROM_TRACE else {k: v for k, v in model.items()
                                            if k not in (FROM_TRACE, "preset", "hf_config")}
    if isinstance(model, dict) and "hf_config" in model:
        if model.get(FROM_TRACE) is True or model.get("preset") is not None:
            raise ScenarioError(f"{src}: model: give one source, hf_config or from_trace/preset, not both")
        shape = _from_hf_config(model["hf_config"], base_dir, src)
    else:
        shape = _from_trace(workload, base_dir, src)
    return {**shape, **over}


def _from_trace(workload: dict, base_dir: Path, src: str) -> dict:
    from traces.format import read_meta
    trace = workload.get("trace") if isinstance(workload, dict) else None
    if not (isinstance(trace, str) and trace):
        raise ScenarioError(f"{src}: model: from_trace needs workload.trace (a trace `emoe capture` wrote); "
                            "a synthetic workload needs a model preset or explicit fields")
    p = Path(trace).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise ScenarioError(f"{src}: workload.trace '{trace}' not found (looked at {p}); "
                            "paths are relative to the scenario file")
    try:
        meta = read_meta(p)
    except UserError as e:
        raise ScenarioError(f"{src}: model: from_trace: {message(e)}") from None
    shape = meta.get("model_shape")
    if not isinstance(shape, dict):
        raise ScenarioError(f"{src}: model: from_trace: trace '{trace}' records no model shape (only traces "
                            "`emoe capture` wrote do); name the model instead: a preset, "
                            "{hf_config: CHECKPOINT_DIR}, or explicit fields")
    return dict(shape)


def _from_hf_config(directory, base_dir: Path, src: str) -> dict:
    from traces.capture import spec_from_config
    if not (isinstance(directory, str) and directory):
        raise ScenarioError(f"{src}: model.hf_config must be a checkpoint directory, got {directory!r}")
    d = Path(directory).expanduser()
    d = d if d.is_absolute() else base_dir / d
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ScenarioError(f"{src}: model.hf_config '{directory}' is not a Hugging Face checkpoint directory "
                            f"(no config.json at {cfg_path}); paths are relative to the scenario file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{src}: model.hf_config: {cfg_path} is not valid JSON ({message(e)})") from None
    if not isinstance(cfg, dict):
        raise ScenarioError(f"{src}: model.hf_config: {cfg_path} is not a config mapping")
    try:
        spec = spec_from_config(SimpleNamespace(**cfg), d.resolve().name)
    except ValueError as e:   # an architecture capture does not know
        raise ScenarioError(f"{src}: model.hf_config: {message(e)}") from None
    except (AttributeError, TypeError) as e:   # a key every MoE config has is missing
        raise ScenarioError(f"{src}: model.hf_config: {cfg_path} is not a MoE model's config "
                            f"({message(e)})") from None
    out = asdict(spec)
    out["source"] = f"Hugging Face config {d.resolve()}"
    return out
