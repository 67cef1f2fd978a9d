"""Estimated output quality from routing fidelity, calibrated on a real model.

`emoe accuracy` measures, per task, the top-1 agreement of a model with its
experts restricted against the unrestricted model, next to the routing fidelity
of that restriction. A calibration file holds those points per task; the
simulator interpolates them to label its fidelity with an estimated agreement -
an estimate from the named model, not a measurement of the simulated one.

Which calibration a run uses: the scenario's `quality.calibration` (a file the
user names, relative to the scenario), else the file in the environment
variable EMOE_QUALITY_CALIBRATION (resolved into the scenario when it loads, so
the results record it), else the package's default, which is only ever read:
`emoe calibrate-quality` writes where `-o` says and refuses the package.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from traces.errors import UserError
from traces import yamlio

DEFAULT = Path(__file__).parent / "presets" / "quality-calibration.yaml"
ENV = "EMOE_QUALITY_CALIBRATION"
PACKAGE_DEFAULT = "package default (sim/presets/quality-calibration.yaml)"


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
    """A user's calibration file (an error if missing or malformed), or with no path the
    package's default (None if the package ships none)."""
    if path is None:
        return _load(str(DEFAULT)) if DEFAULT.exists() else None
    return _load(str(Path(path)))


def source(path=None) -> str:
    """Which calibration `load(path)` reads, as a run's summary names it."""
    return PACKAGE_DEFAULT if path is None else str(path)


@lru_cache(maxsize=8)
def _load(path: str) -> dict:
    """Read once per process: a sweep runs many scenarios against the same file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"quality calibration '{p}' does not exist; write one with `emoe calibrate-quality "
                        "ACCURACY.json --model-name NAME -o FILE`")
    try:
        calib = yamlio.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a quality calibration (malformed YAML: {' '.join(str(e).split())})") from None
    check(calib, str(p))
    return calib


def check(calib, src: str) -> None:
    """A calibration `estimate` can interpolate: model, metric, and per task ('all' required)
    a curve of [fidelity, quality] points in [0, 1], fidelity non-decreasing."""
    if not isinstance(calib, dict) or not {"model", "metric", "curves"} <= set(calib):
        raise UserError(f"{src}: a quality calibration is a mapping with 'model', 'metric' and 'curves' "
                        "(write one with `emoe calibrate-quality`)")
    curves = calib["curves"]
    if not isinstance(curves, dict) or "all" not in curves:
        raise UserError(f"{src}: 'curves' must map task names, and 'all', to [fidelity, quality] points")
    for task, curve in curves.items():
        ok = isinstance(curve, list) and curve and all(
            isinstance(pt, list) and len(pt) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and 0 <= v <= 1 for v in pt) for pt in curve)
        if not ok or any(a[0] > b[0] for a, b in zip(curve, curve[1:])):
            raise UserError(f"{src}: curves.{task} must be a list of [fidelity, quality] pairs in [0, 1] with "
                            "fidelity non-decreasing")


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


def summarize(calib: dict | None, requests, model: str | None = None, calibration: str | None = None) -> dict:
    """Per-task and overall estimated agreement for a run's per-request gate mass kept.

    Quality stands beside latency in every summary: a run that reroutes nothing keeps
    every route's gate mass (fidelity 1) and so estimates 1.0 exactly, and a run that
    reroutes is charged by the calibration curve of the named model. `calibration` is the
    file it came from (None: the package's default), recorded as estimated_quality_calibration."""
    if calib is None or requests.empty or "gate_mass_kept" not in requests:
        return {}
    # Task by task through the categories' codes, not a groupby: a million requests' groupby
    # peaked at ~70 MB of copies. Each task's mean is pandas' Series.mean of its completed
    # requests in table order (NaN skipped: no routes), as a groupby gave.
    task = pd.Categorical(requests["task"])
    codes, done = task.codes, requests["completed"].to_numpy(dtype=bool)
    kept, output = requests["gate_mass_kept"].to_numpy(), requests["output_tokens"].to_numpy()
    per, weights = {}, {}
    for k in np.unique(codes[done & (codes >= 0)]):   # tasks with a completed request, sorted (-1: no task)
        name = str(task.categories[k])
        rows = done & (codes == k)
        per[name] = estimate(calib, name, float(pd.Series(kept[rows]).mean()))
        weights[name] = output[rows].sum()
    total = sum(weights.values())
    overall = float(sum(per[t] * weights[t] for t in per) / max(total, 1)) if per else float("nan")
    return {"estimated_quality": overall, "estimated_quality_per_task": per,
            "estimated_quality_source": provenance(calib, model),
            "estimated_quality_model": calib["model"], "estimated_quality_calibration": source(calibration)}


def write(calib: dict, path) -> Path:
    """Write a user's calibration; never into the package, whose default stays as shipped."""
    from traces.atomic import write_text
    return write_text(check_path(path), yaml.safe_dump(calib, sort_keys=False))   # an earlier one: replaced whole


def check_path(path) -> Path:
    """Where a user's calibration may go: a file name outside the package."""
    p = Path(path)
    root = Path(__file__).resolve().parent.parent
    target = p.resolve()
    for package in (root / "sim", root / "traces", root / "replay"):
        if target == package or package in target.parents:
            raise UserError(f"-o {path}: inside the emoe package ({package}); write your calibration elsewhere "
                            f"and name it with the scenario key quality.calibration or {ENV}")
    if p.is_dir():
        raise UserError(f"-o {path}: is a directory; give a file name, e.g. {p / 'quality-calibration.yaml'}")
    return p


def from_accuracy_json(path, model: str) -> dict:
    """Fit the rows `emoe accuracy --json` wrote; a file that is not such rows is the user's to fix."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"accuracy file '{p}' does not exist; write one with `emoe accuracy ... --json FILE`")
    try:
        rows = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not JSON ({e}); give the file `emoe accuracy --json` wrote") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{p}: expected a non-empty list of rows; give the file `emoe accuracy --json` wrote")
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("task"), str)
                and all(_share(r.get(k)) for k in ("routing_fidelity", "agreement"))):
            raise UserError(f"{p}: row {i} needs 'task' and 'routing_fidelity', 'agreement' in [0, 1]; "
                            "give the file `emoe accuracy --json` wrote")
    return fit(rows, model)


def _share(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
