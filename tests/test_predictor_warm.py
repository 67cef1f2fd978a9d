"""Warm start of the eMoE policy: from a predictor file or from a trace of earlier requests,
eMoE predicts from the first arrival instead of fetching every miss until a request finishes."""
import numpy as np
import pytest

from sim.cli import main
from sim.predictors import make_predictor
from sim.run import run_scenario
from simhelpers import tiny_scenario
from traces.format import save_trace
from traces.synth import synthesize

TASKS = ["qa", "code", "math"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("warm")
    earlier = synthesize("tiny", TASKS, 120, seed=7, profile="paper")
    sim = synthesize("tiny", TASKS, 40, seed=5, profile="paper")
    pred = make_predictor("emoe_a").fit(earlier, np.arange(earlier.n_requests)).save(d / "emoe_a.npz")
    return save_trace(sim, d / "sim.npz"), save_trace(earlier, d / "earlier.npz"), pred


def _before_first_finish(policy, sim_path):
    """Expert copies and stall seconds of the steps before the first request finished."""
    sc = tiny_scenario(sim_path, {"name": "emoe", "capacity": 0.5, **policy},
                       workload__arrival={"process": "batch"})
    r = run_scenario(sc)
    first = r.requests.finish_s.min()
    early = r.timeline[r.timeline.t_s < first]
    assert r.requests.completed.all()
    return int(early.expert_loads.sum()), float(early.stall_s.sum())


def test_warm_start_avoids_the_cold_start_fetches(traces):
    sim_path, earlier_path, pred = traces
    cold = _before_first_finish({"predictor_file": str(pred)}, sim_path)
    warm_file = _before_first_finish({"predictor_file": str(pred), "warm_start": "predictor"}, sim_path)
    warm_trace = _before_first_finish({"warm_start": "trace", "warm_trace": str(earlier_path)}, sim_path)
    synth = {"synthetic": {"tasks": TASKS, "requests": 60, "profile": "paper", "seed": 8}}
    warm_synth = _before_first_finish({"warm_start": "trace", "warm_trace": synth}, sim_path)
    # Cold: every miss of the first batch is fetched (the link stalls the steps); warm: only
    # the first invocation's swap-in is copied, and misses are rerouted.
    assert cold[0] > 0 and cold[1] > 0
    for warm in (warm_file, warm_trace, warm_synth):
        assert warm[0] < cold[0] / 2 and warm[1] < cold[1] / 2


def test_a_warm_trace_of_the_simulated_requests_is_refused(traces, tmp_path):
    sim_path, earlier_path, pred = traces
    with pytest.raises(ValueError, match="warm_trace .* holds 40 of the 40 simulated requests"):
        run_scenario(tiny_scenario(sim_path, {"name": "emoe", "warm_start": "trace", "warm_trace": str(sim_path)}))
    ok = tiny_scenario(sim_path, {"name": "emoe", "warm_start": "trace", "warm_trace": str(sim_path),
                                  "allow_overlap": True})
    assert run_scenario(ok).requests.completed.all()


@pytest.mark.parametrize("policy, words", [
    ("{name: emoe, warm_start: predictor}", "needs predictor_file"),
    ("{name: emoe, warm_start: warm}", "warm_start must be one of none, predictor, trace"),
    ("{name: emoe, warm_trace: x.npz}", "warm_start: trace and warm_trace go together"),
    ("{name: emoe, warm_start: trace, warm_trace: {synthetic: {tasks: [qa]}}}", "warm_trace must be"),
    ("{name: emoe, warm_start: trace, warm_trace: missing.npz}", "does not exist"),
])
def test_warm_start_mistakes_are_one_line_exit_2(traces, tmp_path, capsys, policy, words):
    sim_path, _, _ = traces
    sc = tmp_path / "s.yaml"
    sc.write_text(f"model: tiny\nworkload: {{trace: {sim_path}}}\npolicy: {policy}\n")
    assert main(["run", str(sc), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
