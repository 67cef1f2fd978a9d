"""From a sweep to a chosen policy: constraints, the feasible Pareto set, the chosen scenario,
and the replay of exactly that scenario."""
import pandas as pd
import pytest
import yaml

from sim.choose import choose
from sim.cli import main
from sim.plots import pareto_mask
from simhelpers import TINY_HW


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_trace_path):
    d = tmp_path_factory.mktemp("choose")
    scen = {"name": "c", "model": "tiny", "hardware": {**TINY_HW, "memory_bytes": 6.0e6},
            "workload": {"trace": str(tiny_trace_path), "requests": 12,
                         "arrival": {"process": "poisson", "rate": 20.0},
                         "slo": {"default": {"ttft_s": 0.5, "e2e_s": 2.0}}},
            "policy": {"name": "on_demand"}, "limits": {"max_batch_tokens": 128, "max_running": 8}}
    (d / "b.yaml").write_text(yaml.safe_dump(scen))
    (d / "s.yaml").write_text(yaml.safe_dump({
        "base": "b.yaml", "output": "out",
        "grid": {"policy.capacity": [0.25, 0.5, 0.75, 1.0], "policy.name": ["on_demand", "random"]},
        "seeds": [0, 1]}))
    assert main(["sweep", str(d / "s.yaml")]) == 0
    return d / "out"


def test_choice_is_feasible_pareto_and_best_by_objective(sweep_dir):
    c = choose(sweep_dir, slo_attainment=0.5, min_quality=0.9, objective="memory")
    pooled = c.pooled
    assert len(pooled) == 8 and (pooled.seeds == 2).all()          # seeds pooled per configuration
    assert pooled.e2e_mean_s_ci.notna().all()                       # with a 95% interval
    assert c.chosen is not None and c.chosen.feasible
    assert c.chosen.slo_attainment >= 0.5 and c.chosen.estimated_quality >= 0.9
    # Infeasible configurations never enter the Pareto set; no feasible one dominates a Pareto one.
    assert c.pareto.feasible.all()
    f = pooled[pooled.feasible]
    pts = f[["peak_memory_bytes", "e2e_mean_s"]].assign(q=-f.estimated_quality).to_numpy()
    assert set(f[pareto_mask(pts)].hash) == set(c.pareto.hash)
    assert c.chosen.peak_memory_bytes == c.pareto.peak_memory_bytes.min()
    # A quality floor a rerouting subset cannot meet excludes it; latency as objective picks the fastest.
    fast = choose(sweep_dir, min_quality=0.999, objective="latency").chosen
    assert fast.e2e_mean_s == choose(sweep_dir, min_quality=0.999).pareto.e2e_mean_s.min()
    strict = choose(sweep_dir, min_quality=0.999).pareto
    assert not ((strict.label == "random") & (strict.policy_capacity < 1)).any()   # a subset reroutes


def test_cli_writes_the_chosen_scenario_that_replay_runs(sweep_dir, tmp_path, capsys):
    out = tmp_path / "chosen.yaml"
    assert main(["choose", str(sweep_dir), "--slo-attainment", "0.5", "--min-quality", "0.9",
                 "-o", str(out), "--plot", str(tmp_path / "fig")]) == 0
    text = capsys.readouterr().out
    assert "capacity" in text and "est. quality" in text and "chosen:" in text
    h = text.split("point ")[-1].split()[0]
    # The chosen file is the point's resolved scenario, byte for byte after its header line.
    assert out.read_text().split("\n", 1)[1] == (sweep_dir / "points" / h / "scenario.yaml").read_text()
    assert (tmp_path / "fig" / "pareto.png").stat().st_size > 5000
    # Refuses to overwrite; nothing feasible and bad shares are one-line errors.
    assert main(["choose", str(sweep_dir), "-o", str(out)]) == 2
    with pytest.raises(SystemExit) as stop:    # a share above 1: refused as the argument is read
        main(["choose", str(sweep_dir), "--slo-attainment", "1.5"])
    assert stop.value.code == 2
    assert main(["choose", str(sweep_dir), "--max-memory-gb", "0.000001"]) == 2
    assert main(["choose", str(tmp_path)]) == 2
    pytest.importorskip("torch")
    # `emoe replay` takes the chosen file and a point directory alike.
    assert main(["replay", str(out), "--device", "cpu", "-o", str(tmp_path / "rp")]) == 0
    assert main(["run", str(sweep_dir / "points" / h), "-o", str(tmp_path / "sim")]) == 0
    rp = yaml.safe_load((tmp_path / "rp" / "scenario.yaml").read_text())
    assert rp["policy"] == yaml.safe_load(out.read_text())["policy"]
    assert pd.read_csv(tmp_path / "rp" / "requests.csv").completed.all()
