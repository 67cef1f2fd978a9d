"""Predictor files in the simulator: they predict from the observed history (so runs differ by
predictor, and fidelity follows held-out F1 at p = 1), and a file trained on the simulated
requests is refused unless the scenario allows it."""
import numpy as np
import pytest

from sim.cli import main
from sim.predictors import make_predictor
from sim.predictors.evaluate import evaluate, split_requests
from sim.run import run_scenario
from simhelpers import tiny_scenario
from traces.format import save_trace
from traces.synth import synthesize

TASKS = ["qa", "code", "math"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """A training trace and a simulated one of the paper profile, disjoint (other seed)."""
    d = tmp_path_factory.mktemp("pred")
    train = synthesize("tiny", TASKS, 200, seed=2, profile="paper")
    sim = synthesize("tiny", TASKS, 100, seed=5, profile="paper")
    files = {k: make_predictor(k).fit(train, np.arange(train.n_requests)).save(d / f"{k}.npz")
             for k in ("frequency", "emoe_a", "emoe_l")}
    return d, save_trace(sim, d / "sim.npz"), sim, files


def _run(trace_path, policy, rate=2.0):
    sc = tiny_scenario(trace_path, {"name": "emoe", "capacity": 0.5, "interval": 1, **policy},
                       workload__arrival={"process": "poisson", "rate": rate})
    return run_scenario(sc).summary


def test_fidelity_follows_held_out_f1_and_runs_differ_by_predictor(paper):
    d, sim_path, sim, files = paper
    from sim.predictors import load_predictor
    f1 = {k: evaluate(load_predictor(f), sim, np.arange(sim.n_requests)).f1.mean() for k, f in files.items()}
    assert f1["emoe_a"] > f1["emoe_l"] > f1["frequency"]
    fid = {k: _run(sim_path, {"predictor_file": str(f)})["routing_fidelity"] for k, f in files.items()}
    fid["perfect"] = _run(sim_path, {"predictor": "perfect"})["routing_fidelity"]
    # A file used without the history (its priors only) would make all three the frequency baseline.
    assert len({round(v, 6) for v in fid.values()}) == 4
    assert fid["perfect"] > fid["emoe_a"] > fid["emoe_l"] > fid["frequency"]


def test_a_file_trained_on_the_simulated_requests_is_refused(paper, tmp_path, capsys):
    d, sim_path, sim, files = paper
    tr_idx, _ = split_requests(sim, 0.25, seed=0)
    leaky = make_predictor("emoe_a").fit(sim, tr_idx).save(tmp_path / "leaky.npz")
    with pytest.raises(ValueError, match=rf"trained on {len(tr_idx)} of the 100 simulated requests"):
        _run(sim_path, {"predictor_file": str(leaky)})
    # Through the CLI: one line, exit status 2, naming ids and the way out.
    sc = tmp_path / "s.yaml"
    sc.write_text(f"model: tiny\nworkload: {{trace: {sim_path}}}\n"
                  f"policy: {{name: emoe, capacity: 0.5, predictor_file: {leaky}}}\n")
    assert main(["run", str(sc), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allow_overlap: true" in err and sim.request_id[tr_idx[0]] in err
    assert not (tmp_path / "out").exists()
    # Allowed explicitly, it runs.
    assert _run(sim_path, {"predictor_file": str(leaky), "allow_overlap": True})["routing_fidelity"] > 0


def test_shared_request_ids_alone_are_not_an_overlap(paper):
    """Synthetic traces of different seeds reuse the ids r000000...; their requests differ."""
    d, sim_path, sim, files = paper
    from sim.predictors import load_predictor
    p = load_predictor(files["frequency"])
    assert set(p.train_ids) & set(sim.request_id.tolist())
    assert _run(sim_path, {"predictor_file": str(files["frequency"])})["routing_fidelity"] > 0
