"""Estimated output quality from routing fidelity, calibrated on a real model.

`emoe accuracy` measures, per task, the top-1 agreement of a model with its
experts restricted against the unrestricted model, next to the routing fidelity
of that restriction. A calibration file holds those points per task; the
simulator interpolates them to label its fidelity with an estimated agreement -
an estimate from the named model, not a measurement of the simulated one.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

DEFAULT = Path(__file__).parent / "presets" / "quality-calibration.yaml"


def fit(rows: list[dict], model: str) -> dict:
    """Accuracy rows (task, routing_fidelity, agreement) -> calibration: per task and 'all'."""
    pts: dict[str, list] = {}
    for r in rows:
        pts.setdefault(r["task"], []).append((float(r["routing_fidelity"]), float(r["agreement"])))
        pts.setdefault("all", []).append((float(r["routing_fidelity"]), float(r["agreement"])))
    curves = {}
    for task, p in pts.items():
        p = sorted(p + [(1.0, 1.0)])
        x = np.array([a for a, _ in p])
        y = isotonic(np.array([b for _, b in p]))   # quality does not fall as fidelity rises
        curves[task] = [[round(float(a), 4), round(float(b), 4)] for a, b in zip(x, y)]
    return {"model": model, "metric": "top-1 agreement with all experts", "curves": curves}


def isotonic(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    blocks = [[float(v), 1] for v in y]
    out = []
    for v, w in blocks:
        out.append([v, w])
        while len(out) > 1 and out[-2][0] > out[-1][0]:
            v2, w2 = out.pop()
            v1, w1 = out.pop()
            out.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([[v] * w for v, w in out])


def load(path=None) -> dict | None:
    return _load(str(Path(path) if path else DEFAULT))


@lru_cache(maxsize=8)
def _load(path: str) -> dict | None:
    """Read once per process: a sweep runs many scenarios against the same file."""
    p = Path(path)
    if not p.exists():
        return None
    return yaml.safe_load(p.read_text())


def estimate(calib: dict, task: str, fidelity: float) -> float:
    curve = calib["curves"].get(task) or calib["curves"]["all"]
    x, y = np.array(curve).T
    return float(np.interp(fidelity, x, y))


def provenance(calib: dict, model: str | None = None) -> str:
    """Where an estimate comes from, and whether it speaks for the simulated model."""
    src = f"estimate from {calib['model']} ({calib['metric']})"
    if model and model.split("/")[0] != calib["model"]:   # "name/s32": the same model, scaled
        src += f"; calibrated on {calib['model']}, not {model}: indicative of direction, not of level"
    return src


def summarize(calib: dict | None, requests, model: str | None = None) -> dict:
    """Per-task and overall estimated agreement for a run's per-request gate mass kept.

    Quality stands beside latency in every summary: a run that reroutes nothing keeps
    every route's gate mass (fidelity 1) and so estimates 1.0 exactly, and a run that
    reroutes is charged by the calibration curve of the named model."""
    if calib is None or requests.empty or "gate_mass_kept" not in requests:
        return {}
    done = requests[requests.completed]
    per = {}
    for task, g in done.groupby("task"):
        per[task] = estimate(calib, task, float(g.gate_mass_kept.mean()))
    weights = done.groupby("task").output_tokens.sum()
    overall = float(sum(per[t] * weights[t] for t in per) / max(weights.sum(), 1)) if per else float("nan")
    return {"estimated_quality": overall, "estimated_quality_per_task": per,
            "estimated_quality_source": provenance(calib, model),
            "estimated_quality_model": calib["model"]}


def write(calib: dict, path) -> Path:
    p = Path(path)
    p.write_text(yaml.safe_dump(calib, sort_keys=False))
    return p


def from_accuracy_json(path, model: str) -> dict:
    return fit(json.loads(Path(path).read_text()), model)
