"""`emoe confirm` (profile, replay, simulate the replay's exact model, verdict) and the checks
`emoe compare` makes before comparing: same model shape, dtype and scale, a profile of the
replay's device. Timings are never asserted: only what does not depend on the clock."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from replay.compare import DEFAULT_TOLERANCES, format_verdict, inconclusive, parse_tolerances, passed, verdict
from sim.cli import CONFIRM_FAILED, CONFIRM_INCONCLUSIVE, main
from traces import yamlio
from traces.errors import UserError

torch = pytest.importorskip("torch")


def _scenario_file(tmp_path, trace_path, policy, name="s.yaml", **hw):
    data = {"name": "cf", "seed": 0, "model": "tiny",
            "hardware": {"preset": "a100-40gb", "memory_bytes": 6.0e6, **hw},
            "workload": {"trace": str(trace_path), "requests": 6, "arrival": {"process": "batch"}},
            "policy": policy, "limits": {"max_batch_tokens": 128, "max_running": 4}}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_tolerances_parse_over_the_defaults():
    assert parse_tolerances(None) == DEFAULT_TOLERANCES == {"latency": 0.05, "throughput": 0.05, "memory": 0.02,
                                                            "ttft": 0.15}
    assert parse_tolerances("ttft=0.3,memory=0") == {**DEFAULT_TOLERANCES, "ttft": 0.3, "memory": 0.0}
    assert set(parse_tolerances("0.1").values()) == {0.1}
    for bad in ("latency=x", "speed=0.1", "latency=-1", "nan"):
        with pytest.raises(UserError):
            parse_tolerances(bad)


def test_verdict_bounds_the_relative_error_of_each_metric():
    table = pd.DataFrame({"sim": [1.04, 100.0, 1.0e9, 0.2], "replay": [1.0, 90.0, 1.0e9, None]},
                         index=["e2e_mean_s", "throughput_tokens_per_s", "peak_memory_bytes", "ttft_mean_s"])
    rows = {r["check"]: r for r in verdict(table, DEFAULT_TOLERANCES)}
    assert rows["latency"]["passed"] and rows["latency"]["rel_error"] == pytest.approx(0.04)
    assert not rows["throughput"]["passed"]                      # +11% > 5%
    assert rows["memory"]["passed"]
    assert not rows["ttft"]["passed"] and rows["ttft"]["replay"] is None   # a missing side never passes
    # On CUDA memory is the allocator's peak, what the device really held.
    cuda = {r["check"]: r for r in verdict(table, DEFAULT_TOLERANCES, {"cuda_max_allocated_bytes": 1.5e9})}
    assert cuda["memory"]["replay"] == 1.5e9 and not cuda["memory"]["passed"]


def _judge(sim, replays, tol=0.05):
    """The latency row for a simulated mean end-to-end `sim` against replays of these values."""
    table = pd.DataFrame({"sim": [sim], "replay": [replays[0]]}, index=["e2e_mean_s"])
    return verdict(table, {"latency": tol}, None, [{"e2e_mean_s": v} for v in replays])[0]


def test_repeated_replays_judge_against_their_median_and_their_interquartile_band():
    """A miss against the replays' median is inconclusive (the device's noise) only when the
    replays differ by more than the tolerance and the simulation is within tolerance of some
    point between their quartiles; otherwise a FAIL."""
    row = _judge(1.04, [1.0, 1.02, 0.98])
    assert row["status"] == "pass" and row["replay"] == 1.0 and row["rel_error"] == pytest.approx(0.04)
    assert row["replays"] == [1.0, 1.02, 0.98] and row["replay_spread"] == pytest.approx(0.04)
    assert row["replay_band"] == pytest.approx([0.99, 1.01])
    # The median, not the mean: 1.2 is the mean of [1, 1, 1.6] but +20% on their median.
    row = _judge(1.2, [1.0, 1.0, 1.6])
    assert row["replay"] == 1.0 and not row["passed"] and row["status"] == "inconclusive"   # band 1.0-1.3
    # Two replays 20% apart (band 1.05-1.15): within 5% of the band is inconclusive, beyond it a FAIL,
    # on either side.
    assert _judge(1.20, [1.0, 1.2])["status"] == "inconclusive"
    assert _judge(1.22, [1.0, 1.2])["status"] == "FAIL"
    assert _judge(1.35, [1.0, 1.2])["status"] == "FAIL"        # misses every replay by more than 5%
    assert _judge(1.00, [1.0, 1.2])["status"] == "inconclusive"
    assert _judge(0.95, [1.0, 1.2])["status"] == "FAIL"
    # One outlying replay among five does not excuse a 30% miss of the other four; nor do replays
    # that agree (4% apart) excuse a miss of their median, even one within 5% of a replay.
    assert _judge(1.3, [1.0, 1.0, 1.0, 1.0, 1.3])["status"] == "FAIL"
    assert _judge(1.02 * 1.06, [1.0, 1.04])["status"] == "FAIL"
    # A metric missing from one replay, or zero, is never judged.
    assert _judge(1.0, [1.0, None])["status"] == "FAIL" and _judge(1.0, [1.0, 0.0])["status"] == "FAIL"
    assert _judge(np.int64(3), [np.int64(3), 3.0])["status"] == "pass"        # numpy integers are numbers

    # throughput +10% on 90 (band 85-95), memory +20% with replays 1% apart, ttft +300% (band 0.225-0.275)
    table = pd.DataFrame({"sim": [1.04, 99.0, 1.2e9, 1.0], "replay": [9.0, 9.0, 9.0, 9.0]},
                         index=["e2e_mean_s", "throughput_tokens_per_s", "peak_memory_bytes", "ttft_mean_s"])
    replays = [dict(e2e_mean_s=e, throughput_tokens_per_s=t, peak_memory_bytes=m, ttft_mean_s=f)
               for e, t, m, f in [(1.0, 90.0, 1.0e9, 0.2), (1.02, 80.0, 1.0e9, 0.3), (0.98, 100.0, 1.01e9, 0.25)]]
    rows = {r["check"]: r for r in verdict(table, DEFAULT_TOLERANCES, replays[0], replays)}
    assert [rows[c]["status"] for c in ("latency", "throughput", "memory", "ttft")] == \
        ["pass", "inconclusive", "FAIL", "FAIL"]
    listed = list(rows.values())
    assert not passed(listed) and not inconclusive(listed)
    assert "NOT CONFIRMED - memory, ttft outside tolerance" in format_verdict(listed)
    unsure = [rows["latency"], rows["throughput"]]
    text = format_verdict(unsure)
    assert inconclusive(unsure) and "INCONCLUSIVE - throughput" in text and "3 replays" in text
    assert "22.2%" in text.splitlines()[2]                     # the spread column: (100 - 80) / 90
    assert not inconclusive(unsure, ["not comparable"])        # a refusal is never the device's noise
    assert not inconclusive([rows["latency"]]) and passed([rows["latency"]])
    # One replay: judged as before, pass or FAIL.
    one = {r["check"]: r for r in verdict(table.assign(replay=[1.0, 90.0, 1.0e9, 0.2]), DEFAULT_TOLERANCES)}
    assert one["throughput"]["status"] == "FAIL" and "replay_spread" not in one["throughput"]


def test_confirm_writes_everything_and_simulates_exactly_what_ran(tmp_path, tiny_trace_path, capsys):
    sc = _scenario_file(tmp_path, tiny_trace_path, {"name": "on_demand", "capacity": 0.5})
    out = tmp_path / "c"
    code = main(["confirm", str(sc), "--device", "cpu", "--threads", "1", "--max-copy-mb", "1", "-o", str(out)])
    assert code in (0, CONFIRM_FAILED)
    printed = capsys.readouterr().out
    assert "verdict: " in printed and ("CONFIRMED" in printed)
    for f in ("profile.yaml", "comparison.json", "comparison.md", "verdict.txt", "replay/summary.json",
              "sim/summary.json", "replay/trace.npz"):
        assert (out / f).exists(), f
    report = json.loads((out / "comparison.json").read_text())
    assert [r["check"] for r in report["verdict"]] == ["latency", "throughput", "memory", "ttft"]
    assert report["passed"] == (code == 0) and report["refusals"] == []
    assert report["load_average_before"] is not None and report["threads"] == 1
    # The simulation ran the replay's own model (float32 on CPU) with the profile as hardware.
    sim_sc = yaml.safe_load((out / "sim" / "scenario.yaml").read_text())
    rp_sc = yaml.safe_load((out / "replay" / "scenario.yaml").read_text())
    assert sim_sc["model"] == rp_sc["model"] and sim_sc["model"]["dtype_bytes"] == 4
    assert sim_sc["hardware"] == {"profile": str((out / "profile.yaml").resolve()), "memory_bytes": 6.0e6}
    # All requests at once: batches do not depend on the clock, so both sides took the very same
    # decisions and differ only by the cost model.
    rows = {r["metric"]: r for r in report["comparison"]}
    for m in ("misses", "bytes_loaded", "engine_steps", "requests_completed"):
        assert rows[m]["sim"] == rows[m]["replay"], m
    # The profile was measured for exactly that model, with the scenario's own policy calibrated.
    prof = yaml.safe_load((out / "profile.yaml").read_text())
    assert prof["measured"]["model"]["hidden"] == 64 and prof["measured"]["model"]["dtype_bytes"] == 4
    assert prof["measured"]["expert_copy_s"] > 0 and "layer" in prof["measured"]["expert_s"]
    assert set(report["step_time"]) <= {"decode", "prefill"} and report["step_time"]
    # The same profile is reused as given (no new profile), and a tolerance of zero fails: exit 4.
    out2 = tmp_path / "c2"
    assert main(["confirm", str(sc), "--device", "cpu", "--profile", str(out / "profile.yaml"),
                 "--tolerance", "0", "-o", str(out2)]) == CONFIRM_FAILED
    assert (out2 / "profile.yaml").read_text() == (out / "profile.yaml").read_text()
    assert "NOT CONFIRMED" in (out2 / "verdict.txt").read_text()
    # Generous tolerances pass: exit 0.
    assert main(["confirm", str(sc), "--device", "cpu", "--profile", str(out / "profile.yaml"),
                 "--tolerance", "100", "-o", str(tmp_path / "c3")]) == 0
    # Replayed twice: both replays kept, the verdict against their median with their spread. All
    # requests at once, so the two replays took the same decisions and held the same memory.
    out4 = tmp_path / "c4"
    code = main(["confirm", str(sc), "--device", "cpu", "--profile", str(out / "profile.yaml"), "--replays", "2",
                 "-o", str(out4)])
    assert code in (0, CONFIRM_FAILED, CONFIRM_INCONCLUSIVE)
    rep = json.loads((out4 / "comparison.json").read_text())
    assert rep["replays"] == [str(out4 / "replay"), str(out4 / "replay-2")]
    assert (out4 / "replay-2" / "summary.json").exists() and "decode (replay 2)" in rep["step_time"]
    rows = {r["check"]: r for r in rep["verdict"]}
    memory = rows["memory"]["replays"]
    assert len(memory) == 2 and memory[0] == memory[1] and rows["memory"]["replay_spread"] == 0
    lat = rows["latency"]
    assert lat["replay"] == pytest.approx(sum(lat["replays"]) / 2)      # the median of two
    assert "median of 2 replays" in (out4 / "comparison.md").read_text()
    assert (code == CONFIRM_INCONCLUSIVE) == rep["inconclusive"] and (code == 0) == rep["passed"]


def test_a_replay_that_stops_early_is_left_out_of_the_verdict(tmp_path, tiny_trace_path, monkeypatch, capsys):
    """Replay 2 of 3 stops (out of memory mid-run, or building its model): exit 3, named; the
    verdict is on the replays that completed, and the ones after it do not run."""
    import replay.confirm
    from replay.run import ReplayOOM, replay_scenario
    sc = _scenario_file(tmp_path, tiny_trace_path, {"name": "resident"})
    prof = tmp_path / "p.yaml"
    assert main(["profile", "--device", "cpu", "--max-copy-mb", "1", "--threads", "1", "-o", str(prof)]) == 0
    calls = []

    def stops_mid_run(*a, **k):
        calls.append(1)
        res = replay_scenario(*a, **k)
        if len(calls) == 2:
            res.summary["error"] = "out of memory at step 3 (injected)"
        return res
    monkeypatch.setattr(replay.confirm, "replay_scenario", stops_mid_run)
    out = tmp_path / "c"
    capsys.readouterr()
    assert main(["confirm", str(sc), "--device", "cpu", "--profile", str(prof), "--replays", "3",
                 "-o", str(out)]) == 3
    assert len(calls) == 2 and not (out / "replay-3").exists()
    err = capsys.readouterr().err
    assert "replay 2 of 3: out of memory at step 3 (injected)" in err and str(out / "replay-2") in err
    rep = json.loads((out / "comparison.json").read_text())
    assert rep["judged_replays"] == [str(out / "replay")] and not rep["passed"]
    assert all("replays" not in r for r in rep["verdict"])        # judged on replay 1 alone
    assert "replay 2 of 3 stopped early" in (out / "verdict.txt").read_text()

    def oom_building(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise ReplayOOM("out of memory building tiny (injected)")
        return replay_scenario(*a, **k)
    monkeypatch.setattr(replay.confirm, "replay_scenario", oom_building)
    assert main(["confirm", str(sc), "--device", "cpu", "--profile", str(prof), "--replays", "2",
                 "-o", str(tmp_path / "d")]) == 3
    assert "emoe: error: replay 2 of 2: out of memory building tiny (injected)" in capsys.readouterr().err
    assert (tmp_path / "d" / "comparison.json").exists()     # replay 1 still compared


def test_confirm_exits_5_when_only_the_device_noise_stands_in_the_way(tmp_path, tiny_trace_path, monkeypatch,
                                                                       capsys):
    import replay.confirm
    sc = _scenario_file(tmp_path, tiny_trace_path, {"name": "resident"})
    table = pd.DataFrame({"sim": [1.2], "replay": [1.0]}, index=["e2e_mean_s"])   # +9% on the median 1.1
    rows = verdict(table, {"latency": 0.05}, None, [{"e2e_mean_s": 1.0}, {"e2e_mean_s": 1.2}])
    fake = replay.confirm.Confirmation(tmp_path / "c", rows, [], [], {"replays": ["c/replay", "c/replay-2"]})
    monkeypatch.setattr(replay.confirm, "confirm", lambda *a, **k: fake)
    assert main(["confirm", str(sc), "--device", "cpu", "--replays", "2", "-o", str(tmp_path / "c")]) \
        == CONFIRM_INCONCLUSIVE
    printed = capsys.readouterr().out
    assert "verdict: INCONCLUSIVE - latency" in printed and "replay/, replay-2/, sim/" in printed


def test_confirm_refuses_a_profile_of_another_model_and_bad_options(tmp_path, tiny_trace_path, capsys):
    sc = _scenario_file(tmp_path, tiny_trace_path, {"name": "resident"})
    prof = tmp_path / "p.yaml"
    assert main(["profile", "--device", "cpu", "--max-copy-mb", "1", "--threads", "1", "-o", str(prof)]) == 0
    capsys.readouterr()
    # `emoe profile` without --scenario measures the tiny preset in float32: at --scale 2 it is another model.
    assert main(["confirm", str(sc), "--device", "cpu", "--scale", "2", "--profile", str(prof),
                 "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was measured for tiny" in err[0] and "tiny/s2" in err[0]
    # A profile from before KV blocks: the simulation would count KV per token against the replay's blocks.
    old = yamlio.safe_load(prof.read_text())
    assert old["measured"].pop("kv_block_tokens") == 16
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert main(["confirm", str(sc), "--device", "cpu", "--profile", str(tmp_path / "old.yaml"),
                 "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predates KV blocks" in err[0] and "profile again" in err[0]
    for args in (["--tolerance", "latency=fast"], ["--profile", str(tmp_path / "none.yaml")]):
        assert main(["confirm", str(sc), "--device", "cpu", *args, "-o", str(tmp_path / "y")]) == 2
    with pytest.raises(SystemExit) as stop:     # refused as the argument is read
        main(["confirm", str(sc), "--device", "cpu", "--threads", "0", "-o", str(tmp_path / "y")])
    assert stop.value.code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_compare_refuses_different_models_and_warns_of_datasheet_hardware(tmp_path, tiny_trace_path, capsys):
    sc = _scenario_file(tmp_path, tiny_trace_path, {"name": "on_demand", "capacity": 0.5})
    assert main(["replay", str(sc), "--device", "cpu", "-o", str(tmp_path / "rp")]) == 0
    # The scenario as written (bf16) is not what the CPU replay ran (float32): refused, naming why.
    assert main(["run", str(sc), "-o", str(tmp_path / "sim-bf16")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "sim-bf16"), str(tmp_path / "rp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype_bytes 2 vs 4" in err[0] and "scenario.yaml" in err[0]
    assert main(["compare", str(tmp_path / "sim-bf16"), str(tmp_path / "rp"), "--allow-mismatch"]) == 0
    assert "not comparable: the two sides ran different models" in capsys.readouterr().out
    # The replay's own scenario: the same model, but datasheet hardware: compared, with a warning and a verdict.
    assert main(["run", str(tmp_path / "rp" / "scenario.yaml"), "-o", str(tmp_path / "sim")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "sim"), str(tmp_path / "rp"), "--tolerance", "ttft=1"]) == 0
    text = capsys.readouterr().out
    assert "warning: the simulation used hardware 'a100-40gb'" in text and "verdict: " in text
    assert "100%" in text.split("ttft")[-1]      # the tolerance given is the one applied
