"""Timelines in the Chrome trace event format, from a simulation and from a CPU replay:
valid JSON with each phase's required fields, times consistent with the results."""
import json

import pytest

from sim.chrometrace import write_chrome_trace
from sim.run import run_scenario
from simhelpers import tiny_scenario

REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "C": {"name", "ph", "ts", "pid", "args"},
            "b": {"name", "cat", "ph", "id", "ts", "pid"}, "e": {"name", "cat", "ph", "id", "ts", "pid"},
            "i": {"name", "ph", "ts", "pid", "s"}, "M": {"name", "ph", "pid", "args"}}


def check(path, res):
    trace = json.loads(path.read_text())           # strict JSON: no NaN, no Infinity
    events = trace["traceEvents"]
    for e in events:
        assert REQUIRED[e["ph"]] <= set(e), e
        assert all(isinstance(e[k], (int, float)) for k in ("ts", "dur") if k in e)
        assert e.get("dur", 0) >= 0
    steps = [e for e in events if e["ph"] == "X"]
    assert len(steps) == len(res.timeline)
    assert sum(e["dur"] for e in steps) == pytest.approx(res.timeline.step_s.sum() * 1e6)
    # every request's async slices open and close in pairs, in time order
    opened = {}
    for e in sorted((e for e in events if e["ph"] in "be"), key=lambda e: (e["ts"], e["ph"] == "e")):
        key = (e["id"], e["name"])
        if e["ph"] == "b":
            opened[key] = e["ts"]
        else:
            assert opened.pop(key) <= e["ts"]
    assert not opened
    assert sum(1 for e in events if e["ph"] == "i" and e["name"].startswith("finish")) == len(res.requests)
    return trace


def test_simulated_timeline_is_a_valid_chrome_trace(tiny_trace_path, tmp_path):
    res = run_scenario(tiny_scenario(tiny_trace_path, workload__requests=10))
    d = res.write(tmp_path / "run")
    trace = check(write_chrome_trace(d), res)
    assert trace["otherData"]["engine"] == "sim"
    # a window keeps only the steps that overlap it
    t_mid = float(res.timeline.t_s.median())
    part = json.loads(write_chrome_trace(d, tmp_path / "w.json", window=(0.0, t_mid)).read_text())
    n = sum(1 for e in part["traceEvents"] if e["ph"] == "X")
    assert 0 < n < len(res.timeline)


def test_replayed_timeline_is_a_valid_chrome_trace(tiny_trace_path, tmp_path):
    pytest.importorskip("torch")
    from replay.run import replay_scenario
    sc = tiny_scenario(tiny_trace_path, workload__requests=6, hardware__memory_bytes=6.0e6)
    res = replay_scenario(sc, "cpu")
    trace = check(write_chrome_trace(res.write(tmp_path / "rp")), res)
    assert trace["otherData"]["engine"] == "replay"


def test_cli_writes_the_trace_and_draws_a_window(tiny_trace_path, tmp_path, capsys):
    from sim.cli import main
    d = run_scenario(tiny_scenario(tiny_trace_path, workload__requests=10)).write(tmp_path / "run")
    assert main(["timeline", str(d)]) in (0, None)
    assert (d / "timeline.trace.json").exists()
    assert main(["timeline", str(d)]) == 2                      # the one overwrite rule
    assert "--force" in capsys.readouterr().err
    assert main(["timeline", str(d), "--force", "--window", "0:0.5"]) in (0, None)
    assert main(["plot", str(d), "--kind", "timeline", "--window", "0:0.5", "-o", str(tmp_path / "figs")]) in (0, None)
    assert (tmp_path / "figs" / "timeline_run.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["plot", str(d), "--kind", "timeline", "--window", "3:1"])
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "table.csv").write_text("point,hash,label\n0,h,on_demand\n")
    assert main(["plot", str(sweep), "--kind", "timeline", "-o", str(tmp_path / "f2")]) == 2   # one line, no traceback
    assert "draws results directories" in capsys.readouterr().err


@pytest.mark.parametrize("policy", [{"name": "on_demand", "capacity": 0.5}, {"name": "pregated", "capacity": 0.5}])
def test_layers_place_each_layers_compute_and_each_copy_inside_its_step(tiny_trace_path, tmp_path, policy):
    """`emoe timeline --layers`: the run simulated again inside the window; per step, each layer
    computes once within the step, and the copies on the link are those the step issued."""
    res = run_scenario(tiny_scenario(tiny_trace_path, policy, workload__requests=10))
    d = res.write(tmp_path / "run")
    tl = res.timeline
    window = (float(tl.t_s.iloc[0]), float(tl.t_s.iloc[29] + tl.step_s.iloc[29]))
    events = json.loads(write_chrome_trace(d, tmp_path / "l.json", window=window, layers=True).read_text())
    ev = [e for e in events["traceEvents"] if e["ph"] == "X" and e["cat"] != "step"]
    from traces.model_shape import get_model
    L = get_model("tiny").n_moe_layers
    steps = tl.iloc[:30]
    eps = 1e-3   # microseconds
    for _, s in steps.iterrows():
        a, b = s.t_s * 1e6, (s.t_s + s.step_s) * 1e6
        inside = [e for e in ev if e["cat"] in ("attention", "experts") and a - eps <= e["ts"] < b - eps]
        layers = sorted(e["args"]["layer"] for e in inside if e["cat"] == "experts")
        assert layers == list(range(L))
        assert all(e["ts"] + e["dur"] <= b + eps for e in inside)     # compute ends with its step
    copies = [e for e in ev if e["cat"].endswith("copy")]
    if policy["name"] == "on_demand":     # every copy is the step's own, issued and started in it
        assert len(copies) == int(steps.expert_loads.sum()) > 0
    else:
        assert any(e["cat"] == "prefetch copy" for e in copies)
    link = sorted((e["ts"], e["ts"] + e["dur"]) for e in copies)
    assert all(x[1] <= y[0] + eps for x, y in zip(link, link[1:]))   # one link: copies never overlap


def test_a_cpu_replay_records_its_layers_on_the_wall_clock(tiny_trace_path, tmp_path):
    """The replay's per-layer events are measured as it runs: every layer's attention and
    experts inside its step, copies one at a time on the link."""
    pytest.importorskip("torch")
    from replay.run import replay_scenario
    from traces.model_shape import get_model
    sc = tiny_scenario(tiny_trace_path, workload__requests=4, hardware__memory_bytes=6.0e6)
    res = replay_scenario(sc, "cpu")
    d = res.write(tmp_path / "rp")
    assert (d / "layers.csv").exists()
    events = json.loads(write_chrome_trace(d, tmp_path / "l.json", window=(0.0, 1e9), layers=True).read_text())
    ev = [e for e in events["traceEvents"] if e["ph"] == "X" and e["cat"] != "step"]
    L = get_model("tiny").n_moe_layers
    tl = res.timeline
    eps = 100.0   # microseconds: the wall clock's steps are read around the model's call
    for _, s in tl.iterrows():
        a, b = s.t_s * 1e6 - eps, (s.t_s + s.step_s) * 1e6 + eps
        layers = sorted(e["args"]["layer"] for e in ev if e["cat"] == "attention" and a <= e["ts"] <= b)
        assert layers == list(range(L))
    copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e["cat"].endswith("copy") and e["ts"] >= 0)
    assert copies and all(x[1] <= y[0] + 1.0 for x, y in zip(copies, copies[1:]))   # one link


def test_layers_of_a_replay_without_them_are_refused_with_one_line(tiny_trace_path, tmp_path):
    res = run_scenario(tiny_scenario(tiny_trace_path, workload__requests=4))
    d = res.write(tmp_path / "run")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "engine": "replay"}))   # an older replay's: no layers.csv
    from traces.errors import UserError
    with pytest.raises(UserError, match="replay the scenario again"):
        write_chrome_trace(d, tmp_path / "x.json", layers=True)
