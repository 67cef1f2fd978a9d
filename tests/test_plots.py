"""Standard figures come out of sweep tables and results directories."""
import numpy as np
import pandas as pd
import yaml

from sim.cli import main
from sim.plots import pareto_mask
from simhelpers import TINY_HW


def test_pareto_mask():
    pts = np.array([[1, 5], [2, 2], [3, 3], [5, 1], [1, 5]])
    assert pareto_mask(pts).tolist() == [True, True, False, True, True]


def test_plot_command_on_a_sweep_and_results(tmp_path, tiny_trace_path):
    scen = {"name": "b", "model": "tiny", "hardware": TINY_HW,
            "workload": {"trace": str(tiny_trace_path), "requests": 10}, "policy": {"name": "on_demand"},
            "limits": {"max_batch_tokens": 256}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(scen))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "base": "b.yaml", "output": "out", "grid": {"policy.capacity": [0.25, 0.5, 1.0],
                                                      "policy.name": ["on_demand", "random"],
                                                      "workload.arrival.rate": [5.0, 20.0]}}))
    assert main(["sweep", str(tmp_path / "s.yaml")]) == 0
    t = pd.read_csv(tmp_path / "out" / "table.csv")
    assert {"label", "policy_capacity", "arrival_rate"} <= set(t.columns)
    assert main(["plot", str(tmp_path / "out"), "-o", str(tmp_path / "fig")]) == 0
    for name in ("memory_vs_experts", "quality_vs_memory", "latency_vs_rate", "pareto"):
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 5000
        assert (tmp_path / "fig" / f"{name}.svg").exists()
    pts = sorted((tmp_path / "out" / "points").iterdir())[:2]
    assert main(["plot", *map(str, pts), "-o", str(tmp_path / "cdf")]) == 0
    assert (tmp_path / "cdf" / "cdf_e2e.png").exists()
    assert main(["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
