"""Quality stands beside latency: every run summary (simulated or replayed) carries the
calibrated quality estimate with its provenance, and the plots that rank policies rank
by it rather than by routing fidelity alone."""
import pandas as pd
import pytest

from sim import quality
from sim.plots import pareto_mask, quality_column
from sim.run import run_scenario
from simhelpers import tiny_scenario


def test_estimate_is_one_without_reroutes_and_falls_with_them(tiny_trace_path):
    fetch = run_scenario(tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.25}))
    rer = run_scenario(tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.25, "miss": "reroute"}))
    assert fetch.summary["routing_fidelity"] == 1.0
    assert fetch.summary["estimated_quality"] == pytest.approx(1.0)
    assert rer.summary["routing_fidelity"] < 1.0
    assert rer.summary["estimated_quality"] < fetch.summary["estimated_quality"]
    # The estimate names the model it was calibrated on, and says it is not the simulated one.
    src = rer.summary["estimated_quality_source"]
    assert quality.load()["model"] in src and "not tiny" in src


def test_provenance_says_when_the_calibration_speaks_for_the_model():
    calib = {"model": "emoe-small-moe", "metric": "top-1 agreement with all experts", "curves": {}}
    assert "not" not in quality.provenance(calib, "emoe-small-moe")
    assert "not" not in quality.provenance(calib, "emoe-small-moe/s4")      # a scaled replay of it
    assert "not mixtral-8x7b" in quality.provenance(calib, "mixtral-8x7b")


def test_rankings_use_the_estimate_when_the_table_has_one():
    t = pd.DataFrame({"label": ["a", "b"], "peak_memory_bytes": [1.0, 1.0], "e2e_mean_s": [1.0, 1.0],
                      "routing_fidelity": [0.9, 0.8], "estimated_quality": [0.5, 0.7],
                      "estimated_quality_source": ["estimate from m (x)"] * 2})
    col, label = quality_column(t)
    assert col == "estimated_quality" and "estimate from m" in label
    # Equal memory and latency: the point with the better *quality* is the only Pareto point,
    # although its routing fidelity is lower.
    pts = t[["peak_memory_bytes", "e2e_mean_s"]].assign(q=-t[col]).to_numpy()
    assert pareto_mask(pts).tolist() == [False, True]
    assert quality_column(t.drop(columns=["estimated_quality"]))[0] == "routing_fidelity"


def test_replay_reports_the_same_estimate_as_the_simulator(tiny_trace_path, tmp_path):
    """One meaning in both paths: the replay's summary carries the same estimate."""
    pytest.importorskip("torch")
    from replay.run import replay_scenario
    from sim.scenario import load_scenario
    sc = tiny_scenario(tiny_trace_path, {"name": "random", "capacity": 0.5}, workload__requests=8,
                       workload__arrival={"process": "batch"}, hardware__memory_bytes=6.0e6)
    rp = replay_scenario(sc, "cpu")
    sim = run_scenario(load_scenario(rp.write(tmp_path / "rp") / "scenario.yaml"))
    assert rp.summary["routing_fidelity"] < 1.0
    assert rp.summary["estimated_quality"] == pytest.approx(sim.summary["estimated_quality"])
    assert rp.summary["estimated_quality_source"] == sim.summary["estimated_quality_source"]
