"""From a sweep to a chosen policy: constraints, the feasible Pareto set, the chosen scenario,
and the replay of exactly that scenario."""
import numpy as np
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


# ---- equal terms: hand-made sweep tables -----------------------------------------------------
def _table(d, rows, swept=()):
    """A finished sweep's table.csv with these rows (dicts of metrics; `swept` columns first)."""
    base = dict(status="done", policy_capacity=1.0, requests_completed=36, requests_rejected=0, slo_attainment=1.0,
                estimated_quality=1.0, routing_fidelity=1.0, peak_memory_bytes=10e9, e2e_mean_s=1.0, e2e_p99_s=5.0,
                throughput_tokens_per_s=100.0)
    full = [{"point": i, "hash": f"h{i:03d}", **{k: r[k] for k in swept},
             "policy_name": r["label"], **base, **{k: v for k, v in r.items() if k not in swept}}
            for i, r in enumerate(rows)]
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(full).to_csv(d / "table.csv", index=False)
    return d


def test_policies_are_compared_under_one_setting_of_the_workload(tmp_path):
    from sim.choose import ChooseError
    rows = [dict(label=p, policy=p, **{"workload.arrival.rate": r}, e2e_mean_s=e, throughput_tokens_per_s=x)
            for p, r, e, x in [("resident", 5, 1.0, 88), ("on_demand", 5, 1.2, 88),
                               ("resident", 80, 2.0, 1288), ("on_demand", 80, 2.5, 1288)]]
    d = _table(tmp_path / "s", rows, swept=("workload.arrival.rate", "policy"))
    with pytest.raises(ChooseError, match=r"also varies workload.arrival.rate \(5, 80\).*--at"):
        choose(d, objective="throughput")
    c = choose(d, objective="throughput", at={"workload.arrival.rate": "80"})
    assert len(c.pooled) == 2 and c.chosen.throughput_tokens_per_s == 1288 and c.chosen.label == "resident"
    with pytest.raises(ChooseError, match="not a swept axis"):
        choose(d, at={"policy": "resident"})
    with pytest.raises(ChooseError, match="no finished point"):
        choose(d, at={"workload.arrival.rate": "7"})
    # Null, booleans and dicts as the sweep file spells them (the table holds NaN, True, JSON text).
    rows = [dict(label=p, policy=p, **{"workload.requests": n, "limits.decode_runs": b, "workload.arrival": a},
                 e2e_mean_s=e)
            for p, n, b, a, e in [("resident", None, True, '{"process": "batch"}', 1.0),
                                  ("on_demand", None, True, '{"process": "batch"}', 0.5),
                                  ("resident", 40, False, '{"rate": 2.0, "process": "poisson"}', 3.0),
                                  ("on_demand", 40, False, '{"rate": 2.0, "process": "poisson"}', 2.5)]]
    d = _table(tmp_path / "n", rows, swept=("workload.requests", "limits.decode_runs", "workload.arrival", "policy"))
    with pytest.raises(ChooseError, match=r"workload.requests \(40, null\)"):
        choose(d)
    for at in ({"workload.requests": "null"}, {"limits.decode_runs": "true"},
               {"workload.arrival": "{process: batch}"}):
        c = choose(d, objective="latency", at=at)
        assert len(c.pooled) == 2 and c.chosen.e2e_mean_s == 0.5, at


def test_a_run_that_finished_fewer_requests_is_left_out(tmp_path):
    # Stopped at a time limit, on_demand finished 27 requests (the early, short ones) against
    # resident's 36: its lower mean latency is over other requests.
    d = _table(tmp_path / "s", [dict(label="on_demand", policy="o", requests_completed=27, e2e_mean_s=0.142),
                                dict(label="resident", policy="r", e2e_mean_s=0.149)], swept=("policy",))
    c = choose(d, objective="latency")
    assert c.chosen.label == "resident" and not c.pooled.feasible[0] and c.pooled.incomplete[0]
    assert any("on_demand" in n and "finished fewer requests" in n for n in c.notes)
    # Rejections every configuration shares (a prompt no KV budget fits) exclude nobody; more do.
    d = _table(tmp_path / "t", [dict(label="on_demand", policy="o", requests_rejected=1, e2e_mean_s=0.1),
                                dict(label="resident", policy="r", requests_rejected=1, e2e_mean_s=0.2)],
               swept=("policy",))
    assert choose(d, objective="latency").chosen.label == "on_demand"
    d = _table(tmp_path / "u", [dict(label="on_demand", policy="o", requests_rejected=2, e2e_mean_s=0.1),
                                dict(label="resident", policy="r", requests_rejected=1, e2e_mean_s=0.2)],
               swept=("policy",))
    assert choose(d, objective="latency").chosen.label == "resident"


def test_p99_and_throughput_objectives_reach_beyond_the_mean_latency_front(tmp_path):
    # B is slightly worse on memory and mean latency, far better on p99 and throughput.
    d = _table(tmp_path / "s", [dict(label="A", policy="a", peak_memory_bytes=10e9, e2e_mean_s=1.00, e2e_p99_s=5.0,
                                     throughput_tokens_per_s=100.0),
                                dict(label="B", policy="b", peak_memory_bytes=11e9, e2e_mean_s=1.01, e2e_p99_s=2.0,
                                     throughput_tokens_per_s=300.0)], swept=("policy",))
    assert choose(d, objective="memory").chosen.label == "A"
    assert choose(d, objective="p99").chosen.label == "B"
    assert choose(d, objective="throughput").chosen.label == "B"


def test_an_unknown_quality_is_not_a_perfect_one(tmp_path):
    rows = [dict(label="X", policy="x", estimated_quality=np.nan), dict(label="Y", policy="y", estimated_quality=0.95)]
    d = _table(tmp_path / "s", rows, swept=("policy",))
    assert choose(d, min_quality=0.9).chosen.label == "Y"
    c = choose(d)                                     # no floor: X is feasible, but loses on quality
    assert c.pooled.feasible.all() and list(c.pareto.label) == ["Y"]
    # No calibration at all: quality constrains nothing.
    d = _table(tmp_path / "t", [dict(r, estimated_quality=np.nan) for r in rows], swept=("policy",))
    assert len(choose(d, min_quality=0.9).pareto) == 2


def test_configurations_are_compared_on_the_seeds_all_of_them_finished(tmp_path):
    from sim.choose import _t95
    rows = [dict(label="X", policy="x", seed=0, e2e_mean_s=1.0), dict(label="X", policy="x", seed=1, e2e_mean_s=9.0),
            dict(label="Y", policy="y", seed=0, e2e_mean_s=2.0)]          # Y's seed 1 failed
    d = _table(tmp_path / "s", rows, swept=("policy", "seed"))
    c = choose(d, objective="latency")
    assert c.chosen.label == "X" and (c.pooled.seeds == 1).all()     # seed 0 alone: 1.0 against 2.0
    assert any("seed(s) 0" in n for n in c.notes)
    assert _t95(11) == 2.228 and _t95(30) == 2.045 and abs(_t95(31) - 2.042) < 0.003 and _t95(1000) < 1.97


def test_a_recalibrated_default_is_a_new_sweep_point(tmp_path, monkeypatch, tiny_trace_path):
    import sim.quality
    from sim.scenario import load_scenario
    from sim.sweep import point_hash
    sc = load_scenario(data={"name": "q", "model": "tiny", "hardware": dict(TINY_HW),
                             "workload": {"trace": str(tiny_trace_path)}, "policy": {"name": "on_demand"}})
    cal = tmp_path / "cal.yaml"
    cal.write_text(sim.quality.DEFAULT.read_text())
    monkeypatch.setattr(sim.quality, "DEFAULT", cal)
    before = point_hash(sc)
    cal.write_text(sim.quality.DEFAULT.read_text() + "\n# recalibrated\n")
    assert point_hash(sc) != before


def test_a_share_interval_stays_within_0_and_100_percent():
    """SLO attainment and estimated quality are shares: an interval that would pass 100% (or 0)
    is printed as its range, ending there, not as mean ± half-width."""
    from sim.choose import format_table
    front = pd.DataFrame([dict(label="a", parameters="", policy_capacity=0.5, hash="h1", seeds=3,
                               slo_attainment=0.98, slo_attainment_ci=0.05, estimated_quality=0.5,
                               estimated_quality_ci=0.1, peak_memory_bytes=1e9, e2e_mean_s=1.0,
                               e2e_p99_s=2.0, throughput_tokens_per_s=10.0)])
    text = format_table(front)
    assert "98.0% (93.0%-100.0%)" in text and "±5.0%" not in text
    assert "0.500 ±0.100" in text                         # inside 0..1: mean ± half-width as before
