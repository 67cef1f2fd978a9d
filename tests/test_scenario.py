"""Bad scenarios fail with a message naming the file, the key and the fix."""
from pathlib import Path

import numpy as np
import pytest

from sim.cli import main
from sim.memory import MemoryBudgetError
from sim.run import run_scenario
from sim.scenario import ScenarioError, load_scenario
from traces.format import TraceError, save_trace
from traces.synth import synthesize

GOOD = """
name: ok
model: tiny
hardware: {preset: a100-40gb}
workload:
  trace: tiny.npz
  arrival: {process: poisson, rate: 5}
policy: {name: on_demand, capacity: 0.5}
"""


@pytest.fixture
def scen_dir(tmp_path, tiny_trace_path):
    (tmp_path / "tiny.npz").write_bytes(tiny_trace_path.read_bytes())
    return tmp_path


def _write(d, text, name="s.yaml"):
    p = d / name
    p.write_text(text)
    return p


def test_good_scenario_resolves_with_defaults(scen_dir):
    sc = load_scenario(_write(scen_dir, GOOD))
    assert sc["scheduler"] == {"name": "fcfs"}
    assert sc["limits"]["max_batch_tokens"] == 8192
    assert sc["workload"]["slo"]["default"]["ttft_s"] > 0


def test_set_overrides_and_shorthand(scen_dir):
    p = _write(scen_dir, GOOD)
    sc = load_scenario(p, ["policy.capacity=0.25", "limits.max_running=3", "scheduler=edf"])
    assert sc["policy"]["capacity"] == 0.25 and sc["limits"]["max_running"] == 3
    assert sc["scheduler"] == {"name": "edf"}
    sc = load_scenario(p, ["policy=resident", "workload.arrival={process: batch}"])
    assert sc["policy"] == {"name": "resident"} and sc["workload"]["arrival"] == {"process": "batch"}


@pytest.mark.parametrize("text,msg", [
    ("name: [unclosed", "malformed YAML"),
    (GOOD + "polcy: {name: x}\n", "unknown key(s) polcy; allowed under 'top level'"),
    (GOOD.replace("rate: 5", "rate: 5, burst: 2"), "unknown key(s) workload.arrival.burst"),
    (GOOD.replace("on_demand, capacity: 0.5", "on_demand, capcity: 0.5"),
     "policy 'on_demand': unknown parameter(s) ['capcity']"),
    (GOOD.replace("capacity: 0.5", "capacity: 1.5"), "capacity must be a fraction"),
    (GOOD.replace("name: on_demand", "name: magic"), "policy.name 'magic' is unknown; choose one of resident"),
    (GOOD.replace("model: tiny", "model: gpt-5"), "unknown model preset 'gpt-5'"),
    (GOOD.replace("tiny.npz", "missing.npz"), "workload.trace 'missing.npz' not found"),
    (GOOD.replace("rate: 5", "rate: -1"), "arrival.rate must be a positive number"),
    (GOOD + "limits: {max_running: 0}\n", "max_running must be at least 1"),
    (GOOD.replace("a100-40gb", "tpu-v9"), "unknown hardware preset 'tpu-v9'"),
    (GOOD + "scheduler: {name: fcfs, quantum: 3}\n", "scheduler 'fcfs': unknown parameter(s) ['quantum']"),
    (GOOD + "limits: {decode_runs: maybe}\n", "limits.decode_runs must be true or false"),
])
def test_bad_scenarios(scen_dir, text, msg):
    p = _write(scen_dir, text)
    with pytest.raises(ScenarioError) as e:
        load_scenario(p)
    assert msg in str(e.value)
    assert str(p) in str(e.value)


def test_missing_scenario_file(tmp_path):
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "nope.yaml")


def test_trace_that_does_not_match_the_model(scen_dir):
    save_trace(synthesize("olmoe-1b-7b", ["qa"], 2, seed=0), scen_dir / "olmoe.npz")
    sc = load_scenario(_write(scen_dir, GOOD.replace("tiny.npz", "olmoe.npz")))
    with pytest.raises(TraceError, match="does not match model 'tiny'"):
        run_scenario(sc)


def test_impossible_memory_budget(scen_dir):
    sc = load_scenario(_write(scen_dir, GOOD), ["model=mixtral-8x7b", "policy=resident"])
    from sim.run import build
    from sim.memory import MemoryLedger
    model, hw, _, policy, _ = build(sc, trace=False)
    with pytest.raises(MemoryBudgetError, match=r"impossible memory budget.*lower policy.capacity"):
        MemoryLedger(model, hw, policy, 8192, 0.9)


def test_cli_run_errors_lose_nothing(scen_dir, capsys):
    p = _write(scen_dir, GOOD)
    out = scen_dir / "res"
    assert main(["run", str(p), "-o", str(out)]) == 0
    before = (out / "summary.json").read_text()
    # Same directory again: refused, the first results are untouched.
    assert main(["run", str(p), "-o", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before
    # A failing run (impossible budget) writes nothing.
    bad = scen_dir / "bad"
    assert main(["run", str(p), "-o", str(bad), "--set", "hardware.memory_bytes=1e5"]) == 2
    assert "impossible memory budget" in capsys.readouterr().err
    assert not bad.exists()
    assert not [x for x in scen_dir.iterdir() if x.name.startswith(".")]


def test_results_directory_contents(scen_dir):
    import json
    import pandas as pd
    import yaml
    p = _write(scen_dir, GOOD)
    out = scen_dir / "r"
    assert main(["run", str(p), "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("requests_completed", "peak_memory_bytes", "ttft_mean_s", "ttft_p99_s", "tpot_mean_s",
                "e2e_mean_s", "e2e_p99_s", "throughput_tokens_per_s", "slo_attainment", "expert_hit_rate",
                "bytes_loaded", "routing_fidelity"):
        assert isinstance(s[key], (int, float)) and not np.isnan(s[key]), key
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["code_version"]
    resolved = yaml.safe_load((out / "scenario.yaml").read_text())
    assert resolved["policy"]["capacity"] == 0.5 and resolved["limits"]["max_running"] == 64
    req = pd.read_csv(out / "requests.csv")
    for col in ("arrival_s", "admitted_s", "first_token_s", "finish_s", "ttft_s", "tpot_s", "e2e_s", "slo_met",
                "task", "output_tokens", "hits", "misses", "reroutes", "gate_mass_kept"):
        assert col in req.columns
    tl = pd.read_parquet(out / "timeline.parquet")
    for col in ("mem_dense", "mem_experts", "mem_kv", "mem_activations", "batch_requests", "link_busy_s"):
        assert col in tl.columns


def test_a_pathlib_path_is_a_trace_path(tiny_trace_path):
    """From Python, workload.trace may be a pathlib.Path as well as a str."""
    from sim.scenario import load_scenario
    sc = load_scenario(data={"name": "p", "model": "tiny", "workload": {"trace": tiny_trace_path},
                             "policy": {"name": "resident"}})
    assert sc["workload"]["trace"] == str(tiny_trace_path)


def test_numbers_in_any_yaml_float_form(tmp_path):
    """PyYAML alone reads 2.0e11 as a string; a user means a number."""
    from traces import yamlio
    assert yamlio.safe_load("a: 2.0e11\nb: 1e5\nc: 2.0e+11\nd: 1.5E-3\ne: v1e5") == \
        {"a": 2.0e11, "b": 1e5, "c": 2.0e11, "d": 1.5e-3, "e": "v1e5"}
    f = tmp_path / "s.yaml"
    f.write_text("model: mixtral-8x7b\nhardware: {preset: a100-40gb, count: 4, hbm_bytes_per_s: 2.0e11}\n"
                 "workload: {synthetic: {tasks: [qa], requests: 2}}\npolicy: {name: resident}\n")
    assert load_scenario(f)["hardware"]["hbm_bytes_per_s"] == 2.0e11


def test_a_scenario_name_never_leads_its_results_out_of_runs():
    from sim.cli.common import default_results_dir
    for name in ("../../../x", "/etc/passwd", "a/b", "..", ""):
        d = default_results_dir(name)
        assert d.parent == Path("runs") and ".." not in d.parts and "/" not in d.name
