"""Which quality calibration a run uses, and where `emoe calibrate-quality` writes: the
package's default is only ever read; a user's file comes from the scenario's
quality.calibration or EMOE_QUALITY_CALIBRATION, and the summary names the one used."""
import hashlib
import json

import pytest
import yaml

from sim import quality
from sim.cli import main
from sim.run import run_scenario
from simhelpers import tiny_scenario

REROUTE = {"name": "on_demand", "capacity": 0.25, "miss": "reroute"}   # fidelity < 1: the curve matters


def flat(level: float, model: str = "mine") -> dict:
    """A calibration that estimates `level` whatever the fidelity: its use shows in the summary."""
    return {"model": model, "metric": "top-1 agreement with all experts",
            "curves": {"all": [[0.0, level], [1.0, level]]}}


@pytest.fixture
def calibration(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(flat(0.25)))
    return p


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibrate_quality_writes_where_told_and_never_into_the_package(tmp_path, capsys):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps([{"task": "qa", "routing_fidelity": 0.6, "agreement": 0.5},
                               {"task": "code", "routing_fidelity": 0.8, "agreement": 0.9}]))
    shipped = digest(quality.DEFAULT)
    out = tmp_path / "cal" / "mine.yaml"
    assert main(["calibrate-quality", str(acc), "--model-name", "m", "-o", str(out)]) == 0
    assert f"quality: {{calibration: {out}}}" in capsys.readouterr().out
    calib = quality.load(out)
    assert calib["model"] == "m" and set(calib["curves"]) == {"qa", "code", "all"}
    assert quality.estimate(calib, "qa", 0.6) == pytest.approx(0.5)
    assert digest(quality.DEFAULT) == shipped
    # Run again: refused as it stands; with --force the earlier calibration is replaced whole,
    # no temporary file is left.
    assert main(["calibrate-quality", str(acc), "--model-name", "m2", "-o", str(out)]) == 2
    assert main(["calibrate-quality", str(acc), "--model-name", "m2", "-o", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["model"] == "m2"
    assert [p.name for p in out.parent.iterdir()] == ["mine.yaml"]


def test_a_run_names_the_calibration_it_used(tiny_trace_path, calibration):
    default = run_scenario(tiny_scenario(tiny_trace_path, REROUTE)).summary
    assert default["estimated_quality_calibration"] == quality.PACKAGE_DEFAULT
    mine = run_scenario(tiny_scenario(tiny_trace_path, REROUTE, quality__calibration=str(calibration))).summary
    assert mine["estimated_quality_calibration"] == str(calibration)
    assert mine["estimated_quality"] == pytest.approx(0.25) != default["estimated_quality"]
    assert "estimate from mine" in mine["estimated_quality_source"]
    assert mine["routing_fidelity"] == default["routing_fidelity"]   # the estimate changes, not the run


def test_the_environment_names_a_calibration_the_scenario_does_not(tiny_trace_path, calibration, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv(quality.ENV, str(calibration))
    sc = tiny_scenario(tiny_trace_path, REROUTE)
    assert sc["quality"] == {"calibration": str(calibration)}   # recorded with the results
    assert run_scenario(sc).summary["estimated_quality"] == pytest.approx(0.25)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(flat(0.75, "other")))
    sc = tiny_scenario(tiny_trace_path, REROUTE, quality__calibration=str(other))   # the scenario's key wins
    assert run_scenario(sc).summary["estimated_quality"] == pytest.approx(0.75)


def test_results_rerun_with_the_same_calibration(tiny_trace_path, calibration, tmp_path, capsys):
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump({**{k: v for k, v in tiny_scenario(tiny_trace_path, REROUTE).items()
                                    if not k.startswith("_")}, "quality": {"calibration": "mine.yaml"}}))
    assert main(["run", str(s), "-o", str(tmp_path / "a")]) == 0
    assert f"calibration: {calibration}" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "a" / "scenario.yaml"), "-o", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["estimated_quality_calibration"] == b["estimated_quality_calibration"] == str(calibration)
    assert a["estimated_quality"] == b["estimated_quality"] == pytest.approx(0.25)


def test_quality_summary_is_the_per_task_mean_of_completed_requests():
    """summarize's per-task estimate and overall weighting, computed through the task's codes,
    equal the groupby they replaced (completed requests only, NaN gate mass skipped, tasks with
    no completed request absent, categories or plain strings alike)."""
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(3)
    n = 400
    task = rng.choice(["qa", "code", "math", "translation"], n)
    done = rng.random(n) < 0.7
    done[task == "translation"] = False                     # a task with nothing completed
    kept = np.where(rng.random(n) < 0.1, np.nan, rng.random(n))
    req = pd.DataFrame({"completed": done, "task": task, "gate_mass_kept": kept,
                        "output_tokens": rng.integers(1, 300, n)})
    calib = quality.load(None)
    d = req[req.completed]
    per = {t: quality.estimate(calib, t, float(g.gate_mass_kept.mean())) for t, g in d.groupby("task")}
    w = d.groupby("task").output_tokens.sum()
    want = float(sum(per[t] * w[t] for t in per) / w.sum())
    for table in (req, req.assign(task=pd.Categorical(req.task))):
        got = quality.summarize(calib, table, "mixtral-8x7b")
        assert got["estimated_quality_per_task"] == per and list(got["estimated_quality_per_task"]) == sorted(per)
        assert got["estimated_quality"] == want
