"""A policy of the user's own, outside the package: named `module:Class` in a scenario or
registered by an installed package's entry point, it is validated, simulated, swept and
replayed exactly as a built-in one (sim/plugins.py)."""
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from sim.run import run_scenario
from sim.scenario import ScenarioError, load_scenario
from sim.sweep import load_sweep, run_sweep
from simhelpers import TINY_HW

MRU_FILE = Path(__file__).resolve().parents[1] / "sim" / "policies" / "mru.py"
COUNTERS = ("hits", "misses", "expert_loads", "e2e_mean_s", "engine_steps", "peak_memory_bytes")


def scenario_file(tmp_path, trace_path, policy, name="s.yaml", memory_bytes=TINY_HW["memory_bytes"]):
    data = {"name": "plug", "seed": 1, "model": "tiny", "hardware": {**TINY_HW, "memory_bytes": memory_bytes},
            "workload": {"trace": str(trace_path), "requests": 12,
                         "arrival": {"process": "poisson", "rate": 20.0}},
            "policy": policy, "limits": {"max_batch_tokens": 256, "max_running": 8}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def my_module(tmp_path, monkeypatch):
    """The example policy file copied beside the user's scenarios, as the user's own module."""
    shutil.copy(MRU_FILE, tmp_path / "my_mru.py")
    (tmp_path / "not_a_policy.py").write_text("class Thing:\n    pass\n")
    yield tmp_path
    for mod in ("my_mru", "not_a_policy"):
        sys.modules.pop(mod, None)


def test_a_policy_from_the_users_module_runs_as_the_built_in_one(tiny_trace_path, my_module):
    outside = run_scenario(load_scenario(scenario_file(my_module, tiny_trace_path,
                                                       {"name": "my_mru:MRUPolicy", "capacity": 0.5})))
    inside = run_scenario(load_scenario(scenario_file(my_module, tiny_trace_path,
                                                      {"name": "mru", "capacity": 0.5}, "in.yaml")))
    lru = run_scenario(load_scenario(scenario_file(my_module, tiny_trace_path,
                                                   {"name": "on_demand", "capacity": 0.5}, "lru.yaml")))
    for k in COUNTERS:
        assert outside.summary[k] == inside.summary[k], k
    assert inside.summary["misses"] != lru.summary["misses"]     # MRU is not LRU under another name


def test_the_users_policy_is_validated_like_a_built_in_one(tiny_trace_path, my_module):
    with pytest.raises(ScenarioError, match=r"unknown parameter\(s\) \['eviction'\]"):
        load_scenario(scenario_file(my_module, tiny_trace_path, {"name": "my_mru:MRUPolicy", "eviction": "lru"}))
    with pytest.raises(ScenarioError, match="capacity must be a fraction"):
        load_scenario(scenario_file(my_module, tiny_trace_path, {"name": "my_mru:MRUPolicy", "capacity": 3}))


@pytest.mark.parametrize("name,message", [
    ("no_such_module:MRUPolicy", "no module 'no_such_module' on the Python path or beside the scenario"),
    ("my_mru:Nope", "module 'my_mru' .* has no 'Nope'"),
    ("not_a_policy:Thing", "not a subclass of sim.policies.base.ExpertPolicy"),
    ("my_mru:", "write module:Class"),
    (".my_mru:MRUPolicy", "absolute module name"),
    ("sim.policies.base:ExpertPolicy", "is the base class itself"),
    ("lru_cache", "unknown; choose one of resident, on_demand.*or name your own class as module:Class"),
])
def test_a_policy_that_cannot_be_found_is_a_clear_error(tiny_trace_path, my_module, name, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenario(scenario_file(my_module, tiny_trace_path, {"name": name}))


def test_the_users_policy_sweeps_in_parallel_workers(tiny_trace_path, my_module):
    base = scenario_file(my_module, tiny_trace_path, {"name": "my_mru:MRUPolicy", "capacity": 0.5})
    (my_module / "sweep.yaml").write_text(yaml.safe_dump(
        {"base": base.name, "grid": {"policy.capacity": [0.25, 0.5, 0.75]}}))
    table = run_sweep(load_sweep(my_module / "sweep.yaml"), jobs=2, output=my_module / "out",
                      progress=False)["table"]
    assert (table.status == "done").all(), table.error.tolist()
    assert table.sort_values("policy.capacity").expert_hit_rate.is_monotonic_increasing


def test_editing_the_users_module_reruns_the_sweep_points_that_use_it(tiny_trace_path, my_module):
    """A point is keyed by the module's content: results of the old code are never reused."""
    base = scenario_file(my_module, tiny_trace_path, {"name": "my_mru:MRUPolicy", "capacity": 0.5})
    (my_module / "sweep.yaml").write_text(yaml.safe_dump({"base": base.name, "grid": {"seed": [0, 1]}}))
    first = run_sweep(load_sweep(my_module / "sweep.yaml"), output=my_module / "out", progress=False)
    again = run_sweep(load_sweep(my_module / "sweep.yaml"), output=my_module / "out", progress=False)
    assert first["ran"] == 2 and again["ran"] == 0          # unchanged: resumed, nothing rerun
    with open(my_module / "my_mru.py", "a") as f:
        f.write("\n# edited\n")
    edited = run_sweep(load_sweep(my_module / "sweep.yaml"), output=my_module / "out", progress=False)
    assert edited["ran"] == 2
    assert set(edited["table"].hash) != set(first["table"].hash)


def test_an_installed_plugin_is_found_by_its_entry_point(tiny_trace_path, my_module, monkeypatch):
    """What `pip install` of a package declaring [project.entry-points."emoe.policies"] leaves."""
    dist = my_module / "site" / "my_emoe_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-emoe-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[emoe.policies]\nmru_plugin = my_mru:MRUPolicy\n")
    monkeypatch.syspath_prepend(str(my_module / "site"))
    monkeypatch.syspath_prepend(str(my_module))
    sc = load_scenario(scenario_file(my_module, tiny_trace_path, {"name": "mru_plugin", "capacity": 0.5}))
    plugin = run_scenario(sc).summary
    builtin = run_scenario(load_scenario(scenario_file(my_module, tiny_trace_path,
                                                       {"name": "mru", "capacity": 0.5}, "in.yaml"))).summary
    assert plugin["misses"] == builtin["misses"]
    from sim.plugins import known
    from sim.policies import POLICIES
    assert "mru_plugin" in known("policy", POLICIES)


def test_the_users_policy_replays_on_cpu(tiny_trace_path, my_module):
    pytest.importorskip("torch")
    from replay.run import replay_scenario
    sc = load_scenario(scenario_file(my_module, tiny_trace_path, {"name": "my_mru:MRUPolicy", "capacity": 0.5},
                                     memory_bytes=6.0e6))     # float32 on CPU: twice the bytes
    sc["workload"]["arrival"] = {"process": "batch"}     # batches independent of timing: same decisions
    rp = replay_scenario(sc, "cpu")
    assert rp.requests.completed.all()
    sim = run_scenario(load_scenario(rp.write(my_module / "rp") / "scenario.yaml"))
    for k in ("hits", "misses", "engine_steps"):
        assert rp.summary[k] == sim.summary[k], k


PREDICTOR = '''
import numpy as np

from sim.predictors.base import ExpertPredictor


CALLS = []


class RecentPredictor(ExpertPredictor):
    """The user's own: the task's last finished request, else its prior."""
    kind = "recent"

    def predict(self, task, history, upcoming=None):
        CALLS.append(task)
        return history[-1] / max(history[-1].sum(), 1) if history else self.task_prior(task)
'''


def test_the_users_predictor_drives_emoe(tiny_trace_path, tmp_path):
    """policy.predictor names a predictor class of the user's own, as module:Class."""
    (tmp_path / "my_predictors.py").write_text(PREDICTOR)
    try:
        own = run_scenario(load_scenario(scenario_file(tmp_path, tiny_trace_path, {
            "name": "emoe", "capacity": 0.5, "interval": 2, "predictor": "my_predictors:RecentPredictor"})))
        builtin = run_scenario(load_scenario(scenario_file(tmp_path, tiny_trace_path, {
            "name": "emoe", "capacity": 0.5, "interval": 2, "predictor": "emoe_a"}, "b.yaml")))
        assert own.requests.completed.all() and builtin.requests.completed.all()
        assert len(sys.modules["my_predictors"].CALLS) >= own.summary["requests_completed"] / 2   # it predicted
        with pytest.raises(ScenarioError, match="policy.predictor 'my_predictors:Nope'.*has no 'Nope'"):
            run_scenario(load_scenario(scenario_file(tmp_path, tiny_trace_path, {
                "name": "emoe", "predictor": "my_predictors:Nope"}, "c.yaml")))
    finally:
        sys.modules.pop("my_predictors", None)


def test_two_scenarios_with_same_named_modules_are_not_confused(tiny_trace_path, my_module, tmp_path_factory):
    """Python keeps one module per name: a second, different my_mru.py beside another scenario
    is refused with a clear error instead of silently running the first one."""
    load_scenario(scenario_file(my_module, tiny_trace_path, {"name": "my_mru:MRUPolicy"}))
    other = tmp_path_factory.mktemp("other")
    (other / "my_mru.py").write_text(MRU_FILE.read_text().replace('name = "mru"', 'name = "mru2"'))
    with pytest.raises(ScenarioError, match="a different module 'my_mru' is already loaded"):
        load_scenario(scenario_file(other, tiny_trace_path, {"name": "my_mru:MRUPolicy"}))
