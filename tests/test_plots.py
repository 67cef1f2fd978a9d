"""Standard figures come out of sweep tables and results directories."""
import numpy as np
import pytest
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


def test_figures_draw_a_line_per_hidden_parameter_and_pool_only_seeds():
    """No figure averages silently over a swept parameter it does not show: a second swept
    parameter becomes lines of its own; seeds are pooled into a mean with a 95% interval."""
    from sim.plots import _series
    rows = []
    for rate, seed in [(r, s) for r in (5.0, 20.0) for s in (0, 1, 2)]:
        for cap in (0.25, 0.5):
            rows.append({"point": len(rows), "hash": f"h{len(rows)}", "policy.capacity": cap,
                         "workload.arrival.rate": rate, "seed": seed, "policy_name": "on_demand",
                         "label": "on_demand", "policy_capacity": cap, "arrival_rate": rate,
                         "e2e_mean_s": rate * cap + seed, "peak_memory_bytes": 1e9 * cap})
    t = pd.DataFrame(rows)
    lines = dict(_series(t, "policy_capacity"))
    assert set(lines) == {"on_demand, workload.arrival.rate=5.0", "on_demand, workload.arrival.rate=20.0"}
    pts = lines["on_demand, workload.arrival.rate=20.0"]
    assert pts.e2e_mean_s.tolist() == [20.0 * 0.25 + 1, 20.0 * 0.5 + 1]      # mean over seeds 0, 1, 2
    assert pts.e2e_mean_s_ci.iloc[0] == pytest.approx(4.303 * 1.0 / np.sqrt(3))   # t(2) * sd / sqrt(3)
    assert np.isnan(pts.peak_memory_bytes_ci).all() or (pts.peak_memory_bytes_ci == 0).all()
    by_rate = dict(_series(t, "arrival_rate"))
    assert set(by_rate) == {"on_demand, policy.capacity=0.25", "on_demand, policy.capacity=0.5"}


def test_a_share_error_bar_ends_at_100_percent():
    """SLO attainment's 95% interval is drawn clipped to 0-100%, as `emoe choose` prints it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from sim.plots import _errorbar
    fig, ax = plt.subplots()
    _errorbar(ax, pd.Series([1, 2]), pd.Series([0.98, 0.5]), pd.Series([0.05, 0.1]), "C0", 100, share=True)
    ends = [(round(a[1], 6), round(b[1], 6)) for a, b in ax.collections[-1].get_segments()]
    plt.close(fig)
    assert ends == [(93.0, 100.0), (40.0, 60.0)]
