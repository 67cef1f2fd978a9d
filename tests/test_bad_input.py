"""Bad input, as a user meets it: every case runs `emoe` in-process and must exit 2 with
exactly one line on stderr that names the key, file or option, show no traceback, and leave
every file that was there before byte-identical (and write none). A bug, though, must keep
its traceback."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

import sim
from sim.cli import main
from traces.errors import UserError
from simhelpers import TINY_HW

PACKAGE_PRESETS = Path(sim.__file__).parent / "presets"


def scen(**over) -> dict:
    """A valid tiny scenario (runs in well under a second); `over` replaces top-level sections,
    None drops one."""
    sc = {"name": "t", "seed": 1, "model": "tiny", "hardware": dict(TINY_HW),
          "workload": {"trace": "tiny.npz", "requests": 4, "arrival": {"process": "poisson", "rate": 20.0}},
          "policy": {"name": "on_demand", "capacity": 0.5}, "limits": {"max_batch_tokens": 256, "max_running": 16}}
    sc.update(over)
    return {k: v for k, v in sc.items() if v is not None}


def work(**over) -> dict:
    return {"trace": "tiny.npz", "requests": 4, "arrival": {"process": "poisson", "rate": 20.0}, **over}


def emoe(**params) -> dict:
    return {"name": "emoe", "capacity": 0.5, **params}


RUN = ["run", "s.yaml", "-o", "out"]
SWEEP_OK = {"base": "s.yaml", "grid": {"policy.capacity": [0.5]}}
CALIB_ROWS = [{"task": "qa", "routing_fidelity": 0.8, "agreement": 0.7}]

# (id, argv, expected on the one stderr line, files to create: name -> text | bytes | YAML data, env)
CASES = {
    "arguments": [
        ("no-command", [], "required: COMMAND", {}),
        ("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'", {}),
        ("missing-option", ["trace", "synth", "--model", "tiny"], "-o/--output", {}),
        ("not-an-int", ["trace", "synth", "--model", "tiny", "--requests", "ten", "-o", "x.npz"], "--requests", {}),
        # zero, negative and NaN option values are refused where they are read, never ignored
        ("rate-zero", ["trace", "synth", "--model", "tiny", "--rate", "0", "-o", "x.npz"],
         "--rate: must be a positive number, got '0'", {}),
        ("output-len-zero", ["trace", "synth", "--model", "tiny", "--output-len", "0", "-o", "x.npz"],
         "--output-len: must be a positive number", {}),
        ("prompt-len-nan", ["trace", "synth", "--model", "tiny", "--prompt-len", "nan", "-o", "x.npz"],
         "--prompt-len: expected a finite number", {}),
        ("seed-negative", ["trace", "synth", "--model", "tiny", "--seed", "-1", "-o", "x.npz"],
         "--seed: must be a whole number >= 0", {}),
        ("seq-len-zero", ["capacity", "s.yaml", "--seq-len", "0"], "--seq-len: must be a positive whole number",
         {"s.yaml": scen()}),
        ("slo-share", ["choose", "sweep", "--slo-attainment", "95"], "--slo-attainment: must be a share", {}),
    ],
    "scenario": [
        ("missing", ["run", "nope.yaml", "-o", "out"], "scenario file 'nope.yaml' does not exist", {}),
        ("malformed-yaml", RUN, "s.yaml: malformed YAML", {"s.yaml": "model: [tiny\n"}),
        ("not-a-mapping", RUN, "s.yaml: a scenario is a mapping", {"s.yaml": "- tiny\n"}),
        ("unknown-section", RUN, "unknown key(s) polcy", {"s.yaml": scen(polcy={"name": "resident"})}),
        ("no-model", RUN, "'model' is required", {"s.yaml": scen(model=None)}),
        ("unknown-model", RUN, "model: unknown model preset 'nope'", {"s.yaml": scen(model="nope")}),
        ("model-field", RUN, "model: unknown model key", {"s.yaml": scen(model={"preset": "tiny", "layerz": 2})}),
        ("unknown-hardware", RUN, "hardware: unknown hardware preset 'tpu'", {"s.yaml": scen(hardware="tpu")}),
        ("hardware-profile", RUN, "hardware: hardware profile ",
         {"s.yaml": scen(hardware={"profile": "nope.yaml"})}),
        ("hardware-profile-yaml", RUN, "hardware: ", {"s.yaml": scen(hardware={"profile": "p.yaml"}),
                                                     "p.yaml": "hardware: [1\n"}),
        ("hardware-profile-keys", RUN, "unknown hardware profile key(s) ['foo', 'hardware.hbm']",
         {"s.yaml": scen(hardware={"profile": "p.yaml"}), "p.yaml": "foo: 1\nhardware: {hbm: 2.0e11}\n"}),
        ("hardware-kv-block", RUN, "measured.kv_block_tokens must be a whole number of tokens >= 1",
         {"s.yaml": scen(hardware={"profile": "p.yaml"}), "p.yaml": "hardware: {}\nmeasured: {kv_block_tokens: 0}\n"}),
        ("hardware-value", RUN, "hardware.memory_bytes must be a non-negative number",
         {"s.yaml": scen(hardware={**TINY_HW, "memory_bytes": -1})}),
        ("seed", RUN, "seed must be a whole number >= 0", {"s.yaml": scen(seed="x")}),
        ("seed-negative", RUN + ["--set", "seed=-1"], "seed must be a whole number >= 0, got -1", {"s.yaml": scen()}),
        ("policy-name", RUN, "policy.name 'nope' is unknown", {"s.yaml": scen(policy={"name": "nope"})}),
        ("policy-param", RUN, "policy 'on_demand': unknown parameter(s) ['wobble']",
         {"s.yaml": scen(policy={"name": "on_demand", "wobble": 1})}),
        ("policy-capacity", RUN, "capacity must be a fraction", {"s.yaml": scen(policy={"name": "random",
                                                                                          "capacity": 7})}),
        ("scheduler-name", RUN, "scheduler.name 'lifo' is unknown", {"s.yaml": scen(scheduler={"name": "lifo"})}),
        ("limit-type", RUN, "limits.max_running must be a non-negative int",
         {"s.yaml": scen(limits={"max_running": "many"})}),
        ("limit-range", RUN, "limits.memory_utilization must be in (0, 1]",
         {"s.yaml": scen(limits={"memory_utilization": 2})}),
        ("limit-bool", RUN, "limits.decode_runs must be true or false", {"s.yaml": scen(limits={"decode_runs": 3})}),
        ("set-no-equals", RUN + ["--set", "policy.capacity"], "--set 'policy.capacity': expected KEY.PATH=VALUE",
         {"s.yaml": scen()}),
        ("set-bad-yaml", RUN + ["--set", "policy={name: ["], "value is not valid YAML", {"s.yaml": scen()}),
        ("set-unknown-key", RUN + ["--set", "polcy.capacity=0.4"], "unknown key(s) polcy", {"s.yaml": scen()}),
        ("capacity-compare", ["capacity", "s.yaml", "--compare", "nope"], "policy.name 'nope' is unknown",
         {"s.yaml": scen()}),
        ("impossible-memory", RUN, "impossible memory budget",
         {"s.yaml": scen(hardware={**TINY_HW, "memory_bytes": 1e5})}),
    ],
    "workload": [
        ("trace-missing", RUN, "workload.trace 'gone.npz' not found",
         {"s.yaml": scen(workload=work(trace="gone.npz"))}),
        ("trace-garbage", RUN, "bad.npz: not a readable emoe trace",
         {"s.yaml": scen(workload=work(trace="bad.npz")), "bad.npz": b"\x00not a zip"}),
        ("trace-and-synthetic", RUN, "workload needs exactly one of 'trace'",
         {"s.yaml": scen(workload=work(synthetic={"tasks": ["qa"], "requests": 2}))}),
        ("trace-other-model", RUN, "does not match model 'mixtral-8x7b'", {"s.yaml": scen(model="mixtral-8x7b")}),
        ("tasks-not-in-trace", RUN, "workload.tasks ['poetry'] not in the trace",
         {"s.yaml": scen(workload=work(tasks=["poetry"]))}),
        ("no-arrival-times", RUN, "workload.arrival.process is 'trace' but the trace has no arrival times",
         {"s.yaml": scen(workload=work(arrival={"process": "trace"}))}),
        ("arrival-process", RUN, "workload.arrival.process must be one of",
         {"s.yaml": scen(workload=work(arrival={"process": "bursty"}))}),
        ("arrival-rate", RUN, "workload.arrival.rate must be a positive number",
         {"s.yaml": scen(workload=work(arrival={"rate": -1}))}),
        ("slo", RUN, "workload.slo.default.ttft_s must be a positive number",
         {"s.yaml": scen(workload=work(slo={"default": {"ttft_s": -1}}))}),
        ("requests", RUN, "workload.requests must be a positive integer", {"s.yaml": scen(workload=work(requests=0))}),
        ("requests-bool", RUN, "workload.requests must be a positive integer, got True",
         {"s.yaml": scen(workload=work(requests=True))}),
        ("synthetic-keys", RUN, "workload.synthetic needs 'tasks' and 'requests'",
         {"s.yaml": scen(workload={"synthetic": {"tasks": ["qa"]}})}),
        ("synthetic-requests", RUN, "workload.synthetic.requests must be a positive integer",
         {"s.yaml": scen(workload={"synthetic": {"tasks": ["qa"], "requests": "ten"}})}),
        ("synthetic-task", RUN, "workload.synthetic: unknown task(s) ['poetry']",
         {"s.yaml": scen(workload={"synthetic": {"tasks": ["poetry"], "requests": 2}})}),
    ],
    "policy-files": [
        ("sensitivity-missing", RUN, "policy.sensitivity 'nope.yaml' does not exist",
         {"s.yaml": scen(policy=emoe(sensitivity="nope.yaml"))}),
        ("predictor-missing", RUN, "policy.predictor_file 'nope.npz' does not exist",
         {"s.yaml": scen(policy=emoe(predictor_file="nope.npz"))}),
        ("sensitivity-content", RUN, "policy 'emoe': ", {"s.yaml": scen(policy=emoe(sensitivity="sens.yaml")),
                                                         "sens.yaml": "default: 2\n"}),
        ("sensitivity-yaml", RUN, "policy 'emoe': ", {"s.yaml": scen(policy=emoe(sensitivity="sens.yaml")),
                                                      "sens.yaml": "tasks: {qa: [1\n"}),
        ("predictor-garbage", RUN, "policy 'emoe': ", {"s.yaml": scen(policy=emoe(predictor_file="bad.npz")),
                                                       "bad.npz": b"PK\x03\x04junk"}),
        ("predictor-other-model", RUN, "policy 'emoe': ", {"s.yaml": scen(policy=emoe(predictor_file="other.npz"))}),
    ],
    "quality": [
        ("missing", RUN, "quality.calibration 'nope.yaml' does not exist",
         {"s.yaml": scen(quality={"calibration": "nope.yaml"})}),
        ("malformed", RUN, "quality.calibration: ", {"s.yaml": scen(quality={"calibration": "c.yaml"}),
                                                     "c.yaml": "model: x\n"}),
        ("malformed-yaml", RUN, "quality.calibration: ", {"s.yaml": scen(quality={"calibration": "c.yaml"}),
                                                          "c.yaml": "curves: [\n"}),
        ("unknown-key", RUN, "unknown key(s) quality.file", {"s.yaml": scen(quality={"file": "c.yaml"})}),
        ("sensitivity-missing", RUN, "quality.sensitivity must be a file from `emoe sensitivity`",
         {"s.yaml": scen(quality={"sensitivity": "nope.yaml"})}),
        ("sensitivity-content", RUN, "quality.sensitivity: ", {"s.yaml": scen(quality={"sensitivity": "s2.yaml"}),
                                                               "s2.yaml": "default: 2\n"}),
        ("sensitivity-tasks-list", RUN, "quality.sensitivity: 'tasks' must map each task",
         {"s.yaml": scen(quality={"sensitivity": {"tasks": [1]}})}),
        ("sensitivity-layer-value", RUN, "'qa' must list a sensitivity in [0, 1] per layer",
         {"s.yaml": scen(policy=emoe(sensitivity={"tasks": {"qa": [1, 2, 3, 4]}}))}),
        ("environment", RUN, "EMOE_QUALITY_CALIBRATION='nope.yaml' does not exist", {"s.yaml": scen()},
         {"EMOE_QUALITY_CALIBRATION": "nope.yaml"}),
        ("accuracy-missing", ["calibrate-quality", "acc.json", "--model-name", "m", "-o", "c.yaml"],
         "accuracy file 'acc.json' does not exist", {}),
        ("accuracy-not-json", ["calibrate-quality", "acc.json", "--model-name", "m", "-o", "c.yaml"],
         "acc.json: not JSON", {"acc.json": "{rows"}),
        ("accuracy-rows", ["calibrate-quality", "acc.json", "--model-name", "m", "-o", "c.yaml"],
         "acc.json: row 0 needs 'task'", {"acc.json": json.dumps([{"task": "qa"}])}),
        ("into-the-package", ["calibrate-quality", "acc.json", "--model-name", "m", "-o",
                              str(PACKAGE_PRESETS / "quality-calibration.yaml")],
         "inside the emoe package", {"acc.json": json.dumps(CALIB_ROWS)}),
        ("no-output", ["calibrate-quality", "acc.json", "--model-name", "m"], "-o/--output",
         {"acc.json": json.dumps(CALIB_ROWS)}),
    ],
    "outputs": [
        ("results-not-empty", RUN, "results directory 'out' exists and is not empty",
         {"s.yaml": scen(), "out/keep.txt": "precious"}),
        ("results-is-a-file", RUN, "-o out: a file of that name exists", {"s.yaml": scen(), "out": "precious"}),
        ("results-under-a-file", ["run", "s.yaml", "-o", "f/out"], "-o f/out: 'f' is a file",
         {"s.yaml": scen(), "f": "precious"}),
        ("json-is-a-directory", ["capacity", "s.yaml", "--json", "j"], "--json j: is a directory",
         {"s.yaml": scen(), "j/keep.txt": "precious"}),
        ("trace-under-a-file", ["trace", "synth", "--model", "tiny", "--requests", "2", "-o", "f/x.npz"],
         "f: ", {"f": "precious"}),
        ("plots-into-a-file", ["trace", "stats", "tiny.npz", "--plot", "f"], "(a path given on the command line)",
         {"f": "precious"}),
        ("stats-json-is-a-directory", ["trace", "stats", "tiny.npz", "--json", "j"], "--json j: is a directory",
         {"j/keep.txt": "precious"}),
    ],
    "traces": [
        ("info-missing", ["trace", "info", "gone.npz"], "trace file 'gone.npz' does not exist", {}),
        ("info-garbage", ["trace", "info", "bad.npz"], "not a readable emoe trace", {"bad.npz": b"PK\x03\x04junk"}),
        ("synth-model", ["trace", "synth", "--model", "nope", "-o", "x.npz"], "unknown model preset 'nope'", {}),
        ("synth-task", ["trace", "synth", "--model", "tiny", "--tasks", "poetry", "-o", "x.npz"], "unknown task", {}),
        ("synth-knob-value", ["trace", "synth", "--model", "tiny", "--knob", "temporal_copy=lots", "-o", "x.npz"],
         "--knob temporal_copy=lots: expected NAME=NUMBER", {}),
        ("import-missing", ["trace", "import", "r.jsonl", "--model", "tiny", "-o", "x.npz"],
         "routing file 'r.jsonl' does not exist", {}),
        ("import-json", ["trace", "import", "r.jsonl", "--model", "tiny", "-o", "x.npz"], "r.jsonl:1: not valid JSON",
         {"r.jsonl": "{task: qa\n"}),
        ("import-model", ["trace", "import", "r.jsonl", "--model", "nope", "-o", "x.npz"],
         "--model: unknown model preset 'nope'", {"r.jsonl": "{}\n"}),
    ],
    "sweeps": [
        ("missing", ["sweep", "nope.yaml", "-o", "sw"], "sweep file 'nope.yaml' does not exist", {}),
        ("unknown-key", ["sweep", "w.yaml", "-o", "sw"], "unknown key(s) ['grids']",
         {"w.yaml": {"base": "s.yaml", "grids": {}}, "s.yaml": scen()}),
        ("base-missing", ["sweep", "w.yaml", "-o", "sw"], "base 'nope.yaml' not found",
         {"w.yaml": {"base": "nope.yaml"}}),
        ("grid-not-a-list", ["sweep", "w.yaml", "-o", "sw"], "grid.policy.capacity must be a non-empty list",
         {"w.yaml": {"base": "s.yaml", "grid": {"policy.capacity": 0.5}}, "s.yaml": scen()}),
        ("jobs", ["sweep", "w.yaml", "-j", "0", "-o", "sw"], "-j/--jobs: must be a positive whole number",
         {"w.yaml": SWEEP_OK, "s.yaml": scen()}),
        ("output-is-a-file", ["sweep", "w.yaml", "-o", "sw"], "sweep output 'sw': a file is in the way",
         {"w.yaml": SWEEP_OK, "s.yaml": scen(), "sw": "precious"}),
    ],
    "predictors": [
        ("kind", ["predictor", "train", "tiny.npz", "--kind", "oracle", "-o", "p.npz"],
         "--kind: invalid choice: 'oracle'", {}),
        ("holdout", ["predictor", "train", "tiny.npz", "--holdout", "1.5", "-o", "p.npz"],
         "--holdout: must be a share strictly between 0 and 1", {}),
        ("trace-missing", ["predictor", "train", "gone.npz", "-o", "p.npz"],
         "trace file 'gone.npz' does not exist", {}),
        ("file-missing", ["predictor", "eval", "nope.npz", "tiny.npz"], "predictor file 'nope.npz' does not exist", {}),
        ("file-garbage", ["predictor", "eval", "bad.npz", "tiny.npz"], "bad.npz: not a predictor file",
         {"bad.npz": b"\x93NUMPY junk"}),
        ("other-model", ["predictor", "eval", "other.npz", "tiny.npz"], "predictor is for 1 layers x 4 experts", {}),
        ("top-too-many", ["predictor", "eval", "tiny-pred.npz", "tiny.npz", "--top", "99"],
         "--top 99: the trace's model has", {}),
        ("top-zero", ["predictor", "eval", "tiny-pred.npz", "tiny.npz", "--top", "0"],
         "--top: must be a positive whole number", {}),
    ],
    "plots": [
        ("plot-nothing", ["plot", "nowhere", "-o", "pl"], "nowhere: neither a sweep directory", {}),
        ("plot-table", ["plot", "t.csv", "-o", "pl"], "the table has no 'label' column", {"t.csv": "a,b\n1,2\n"}),
        ("compare", ["compare", "a", "b"], "'a' is not a results directory", {"a/x.txt": "", "b/x.txt": ""}),
        ("compare-damaged", ["compare", "a", "b"], "summary.json: damaged", {"a/summary.json": "{bad",
                                                                               "b/summary.json": "{}"}),
        ("choose", ["choose", "nowhere"], "'nowhere' is not a sweep directory", {}),
    ],
    "real-models": [
        ("replay-scale", ["replay", "s.yaml", "--scale", "0", "-o", "out"], "--scale: must be a positive whole number",
         {"s.yaml": scen()}),
        ("replay-device", ["replay", "s.yaml", "--device", "tpu", "-o", "out"], "--device tpu: use cpu or cuda",
         {"s.yaml": scen()}),
        ("replay-weights", ["replay", "s.yaml", "--weights", "nope", "-o", "out"],
         "'nope' is not a Hugging Face checkpoint directory", {"s.yaml": scen()}),
        ("profile-threads", ["profile", "--threads", "0", "-o", "p.yaml"],
         "--threads: must be a positive whole number", {}),
        ("accuracy-model", ["accuracy", "--model", "nope", "--prompts", "p.jsonl"],
         "--model: 'nope' is not a Hugging Face checkpoint", {}),
        ("capture-model", ["capture", "--model", "nope", "--prompts", "p.jsonl", "-o", "x.npz"],
         "--model nope: not a Hugging Face checkpoint", {}),
        ("capture-prompts", ["capture", "--model", "m", "--prompts", "p.jsonl", "-o", "x.npz"],
         "--prompts: p.jsonl:1: each line needs string fields 'task' and 'prompt'",
         {"m/config.json": "{}", "p.jsonl": '{"task": "qa"}\n'}),
        ("prompts-task", ["prompts", "--tasks", "poetry", "-o", "p.jsonl"], "unknown task(s) ['poetry']", {}),
        ("prompts-data", ["prompts", "--data", "nowhere", "-o", "p.jsonl"], "--data nowhere: no such directory", {}),
    ],
}
PARAMS = [pytest.param(*case[1:4], case[4] if len(case) > 4 else {}, id=f"{group}/{case[0]}")
          for group, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Files every case finds in its directory: a small trace of the tiny model, a predictor
    trained on its first request, and a predictor file of another routing shape (1 layer x 4 experts)."""
    from conftest import make_trace
    from sim.predictors import make_predictor
    from traces.format import save_trace
    from traces.synth import synthesize
    d = tmp_path_factory.mktemp("assets")
    tiny = synthesize("tiny", ["qa", "code"], 6, seed=2)
    save_trace(tiny, d / "tiny.npz")
    make_predictor("frequency").fit(tiny, [0]).save(d / "tiny-pred.npz")
    other = make_trace(np.array([[[0]], [[1]], [[2]], [[3]]]), [2, 2], [0, 0])
    make_predictor("frequency").fit(other, [0]).save(d / "other.npz")
    return d


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:   # argparse's own exit
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,expect,files,env", PARAMS)
def test_bad_input_is_one_line_exit_2_and_nothing_changes(argv, expect, files, env, assets, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    for p in assets.iterdir():
        shutil.copy(p, tmp_path / p.name)
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    package_before = snapshot(PACKAGE_PRESETS)
    before = snapshot(tmp_path)
    rc, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("emoe"), err
    assert expect in lines[0], err
    assert snapshot(tmp_path) == before, "a failed command changed or wrote files"
    assert snapshot(PACKAGE_PRESETS) == package_before


# ---- a bug is not a user error --------------------------------------------------------------------------------
@pytest.fixture
def runnable(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(assets / "tiny.npz", tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scen()))
    return tmp_path


@pytest.mark.parametrize("error", [KeyError("n_experts"), ValueError("negative step time"),
                                   FileNotFoundError(2, "No such file or directory", "/nowhere/internal.yaml")])
def test_an_error_deep_in_the_engine_keeps_its_traceback(error, runnable, monkeypatch):
    """KeyError, ValueError and missing files used to be printed as user errors wherever they came
    from; now only a UserError is, or the OS refusing a path the user gave."""
    from sim.engine import Engine

    def broken(self):
        raise error
    monkeypatch.setattr(Engine, "run", broken)
    with pytest.raises(type(error)):
        main(["run", "s.yaml", "-o", "out"])
    assert not (runnable / "out").exists()


def test_a_bug_shows_its_traceback_and_exit_status_1(runnable):
    code = ("import sys; from sim.engine import Engine\n"
            "def broken(self): raise KeyError('n_experts')\n"
            "Engine.run = broken\n"
            "from sim.cli import main; sys.exit(main(['run', 's.yaml', '-o', 'out']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "KeyError: 'n_experts'" in out.stderr


# ---- whatever a user writes at a scenario key: a scenario or a UserError -----------------------------
KEYS = ["seed", "model", "hardware", "hardware.count", "hardware.memory_bytes", "workload", "workload.trace",
        "workload.requests", "workload.tasks", "workload.arrival", "workload.arrival.rate", "workload.slo",
        "workload.slo.qa", "workload.synthetic", "workload.synthetic.requests", "policy", "policy.name",
        "policy.capacity", "policy.miss", "policy.eviction", "policy.interval", "policy.sensitivity",
        "policy.predictor_file", "scheduler", "scheduler.name", "limits", "limits.max_running",
        "limits.max_batch_tokens", "limits.memory_utilization", "limits.decode_runs", "quality",
        "quality.calibration", "quality.sensitivity"]
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 64) | st.floats(allow_nan=True)   # small: a valid one runs
    | st.sampled_from(["", "tiny", "qa", "code", "batch", "poisson", "emoe", "on_demand", "edf", "a100-40gb",
                      "tiny.npz", "x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "process", "rate", "tasks", "requests", "preset", "ttft_s", "calibration",
                         "capacity", "synthetic", "x"]),
        inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(key=st.sampled_from(KEYS), value=YAML_VALUES)
def test_any_value_at_any_key_builds_or_is_one_user_error(key, value, assets):
    """Loading, validating and building (model, hardware, trace, policy) from any YAML value at a
    scenario key gives a runnable scenario or a UserError, never another exception."""
    from sim.scenario import load_scenario
    data = scen(workload=work(trace=str(assets / "tiny.npz")))
    from sim.run import build
    try:
        build(load_scenario(overrides=[(key, value)], data=data))
        event("runnable")
    except UserError as e:   # anything else escapes and fails the test: it would be a traceback
        event("user error")
        assert str(e)
