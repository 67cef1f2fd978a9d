"""Replay on CPU: the simulator's own policy objects on a real (tiny) model and clock."""
import json

import pytest

torch = pytest.importorskip("torch")

from replay.compare import compare
from replay.run import replay_scenario
from sim.cli import main
from sim.run import run_scenario
from sim.scenario import load_scenario
from simhelpers import TINY_HW


def scenario(trace_path, policy, arrival=None, requests=16):
    return load_scenario(data={
        "name": "rp", "seed": 0, "model": "tiny", "hardware": {**TINY_HW, "memory_bytes": 6.0e6},
        "workload": {"trace": str(trace_path), "requests": requests,
                     "arrival": arrival or {"process": "batch"}},
        "policy": policy, "limits": {"max_batch_tokens": 128, "max_running": 8}})


@pytest.mark.parametrize("policy", [{"name": "resident"}, {"name": "on_demand", "capacity": 0.5},
                                    {"name": "emoe", "capacity": 0.5, "interval": 4}])
def test_replay_completes_and_makes_the_simulators_decisions(tiny_trace_path, policy, tmp_path):
    rp = replay_scenario(scenario(tiny_trace_path, policy), "cpu")
    req = rp.requests
    assert req.completed.all() and len(req) == 16
    assert (req.generated_tokens == req.output_tokens).all()
    # Every request present at t=0: batches do not depend on timing, so the same policy
    # objects must take exactly the same decisions as in the simulator.
    # The replay's resolved scenario names the model it ran (float32 on CPU) and its trace.
    sim = run_scenario(load_scenario(rp.write(tmp_path / "rp") / "scenario.yaml"))
    for key in ("hits", "misses", "reroutes", "bytes_loaded", "engine_steps", "preemptions"):
        assert rp.summary[key] == sim.summary[key], key
    assert rp.summary["routing_fidelity"] == pytest.approx(sim.summary["routing_fidelity"])
    assert rp.summary["h2d_bytes"] >= rp.summary["bytes_loaded"]


def test_results_directory_round_trip_and_compare(tiny_trace_path, tmp_path, capsys):
    sc = tmp_path / "s.yaml"
    import yaml
    data = scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5})
    sc.write_text(yaml.safe_dump({k: v for k, v in data.items() if not k.startswith("_")}))
    assert main(["replay", str(sc), "--device", "cpu", "-o", str(tmp_path / "rp")]) == 0
    written = yaml.safe_load((tmp_path / "rp" / "scenario.yaml").read_text())
    assert written["workload"]["trace"] == "trace.npz" and (tmp_path / "rp" / "trace.npz").exists()
    # The replay's own scenario simulates the very model and trace it ran.
    assert main(["run", str(tmp_path / "rp" / "scenario.yaml"), "-o", str(tmp_path / "sim")]) == 0
    table = compare(tmp_path / "sim", tmp_path / "rp")
    assert table.loc["misses", "rel_error"] == 0
    assert table.loc["weights_plus_cache_bytes", "rel_error"] == pytest.approx(0, abs=0.02)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "sim"), str(tmp_path / "rp"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["metric"] for r in rows} >= {"e2e_mean_s", "throughput_tokens_per_s", "peak_memory_bytes"}


def test_out_of_memory_keeps_what_was_done(tiny_trace_path, tmp_path, monkeypatch):
    from replay import model as rm
    real = rm.ReplayModel.step
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **kw)
    monkeypatch.setattr(rm.ReplayModel, "step", flaky)
    res = replay_scenario(scenario(tiny_trace_path, {"name": "resident"}), "cpu")
    assert "out of memory at engine step 40" in res.summary["error"]
    assert "largest size that fitted" in res.summary["error"]
    done = res.requests.completed.sum()
    assert 0 < done < 16
    out = res.write(tmp_path / "partial")
    assert (out / "requests.csv").exists() and (out / "summary.json").exists()


def test_replay_holds_the_memory_the_simulator_counts(tiny_trace_path, tmp_path):
    """What the replay holds is what the simulator's ledger counts: KV per block of tokens as it
    is written (a profile records the replay's block), the cache's slots and its staging buffer,
    dense weights, activations and logits; part by part, exactly."""
    from replay.model import KV_BLOCK_TOKENS
    data = scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5})
    data["hardware"] = {**data["hardware"], "measured": {"kv_block_tokens": KV_BLOCK_TOKENS}}
    rp = replay_scenario(data, "cpu")
    resolved = rp.write(tmp_path / "rp") / "scenario.yaml"
    sim = run_scenario(load_scenario(resolved))
    assert rp.summary["misses"] > 0           # experts streamed through the staging slots
    for part in ("dense", "experts", "kv", "activations"):
        assert rp.summary[f"peak_{part}_bytes"] == sim.summary[f"peak_{part}_bytes"], part
    assert rp.summary["peak_memory_bytes"] == sim.summary["peak_memory_bytes"]
    # Stepping one by one (no decode runs) counts the same blocks.
    one_by_one = load_scenario(resolved)
    one_by_one["limits"]["decode_runs"] = False
    steps = run_scenario(one_by_one)
    assert steps.summary["peak_kv_bytes"] == sim.summary["peak_kv_bytes"]


def test_kv_grows_in_blocks_and_a_tied_head_is_the_embedding():
    from dataclasses import replace

    from replay.model import KV_BLOCK_TOKENS, ReplayModel
    from traces.model_shape import get_model
    spec = replace(get_model("tiny"), dtype_bytes=4)
    rt = ReplayModel(spec, n_slots=4)
    per_token = 2 * spec.n_moe_layers * spec.n_kv_heads * spec.hd * 4
    rt.kv_alloc(7, 5)
    assert rt.kv_bytes() == KV_BLOCK_TOKENS * per_token
    rt.kv[7][0][0][:5] = 1.0
    rt.kv_alloc(7, KV_BLOCK_TOKENS + 1)       # outgrows its block: a larger buffer, the KV copied over
    assert rt.kv_bytes() == 2 * KV_BLOCK_TOKENS * per_token and (rt.kv[7][0][0][:5] == 1.0).all()
    rt.kv_free(7)
    assert rt.kv_bytes() == 0
    assert rt.head is not rt.embed and rt.dense_bytes == spec.dense_bytes
    tied = replace(spec, tied_embeddings=True)
    rt = ReplayModel(tied, n_slots=4)
    assert rt.head is rt.embed and rt.dense_bytes == tied.dense_bytes


def test_cuda_requested_without_a_gpu_is_a_clear_error(tiny_trace_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        replay_scenario(scenario(tiny_trace_path, {"name": "resident"}), "cuda")


def test_profile_writes_a_usable_hardware_profile(tiny_trace_path, tmp_path):
    import yaml
    data = scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5}, requests=6)
    sc = tmp_path / "s.yaml"
    sc.write_text(yaml.safe_dump({k: v for k, v in data.items() if not k.startswith("_")}))
    assert main(["profile", "--device", "cpu", "--scenario", str(sc), "--max-copy-mb", "1",
                 "-o", str(tmp_path / "p.yaml")]) == 0
    prof = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert prof["hardware"]["h2d_bytes_per_s"] > 0 and prof["measured"]["expert_s"]["b"] >= 0
    # The simulator picks the measured cost functions up for this model shape.
    from sim.costmodel import CostModel
    from sim.hardware import get_hardware
    from traces.model_shape import get_model
    from dataclasses import replace
    hw = get_hardware({"profile": str(tmp_path / "p.yaml")})
    assert CostModel(replace(get_model("tiny"), dtype_bytes=4), hw).measured is not None
    assert CostModel(get_model("mixtral-8x7b"), hw).measured is None


def test_shared_experts_are_replayed_and_profiled(tiny_trace_path, tmp_path):
    """Qwen-MoE / DeepSeek-style shared experts: computed for every token on the device,
    counted in the dense weights like the simulator does, and timed by the profile."""
    shared_tiny = {"preset": "tiny", "name": "tiny-shared", "n_shared_experts": 1, "shared_ffn": 256}
    data = scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5}, requests=6)
    data["model"] = shared_tiny
    rp = replay_scenario(data, "cpu")
    plain = replay_scenario(scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5}, requests=6), "cpu")
    H = 64
    assert rp.summary["weights_plus_cache_bytes"] - plain.summary["weights_plus_cache_bytes"] == 4 * 4 * 3 * H * 256
    sim = run_scenario(load_scenario(rp.write(tmp_path / "rp") / "scenario.yaml"))
    assert rp.summary["weights_plus_cache_bytes"] == pytest.approx(
        sim.summary["peak_dense_bytes"] + sim.summary["peak_experts_bytes"], rel=0.02)
    from dataclasses import replace

    from replay.profile import model_profile
    from traces.model_shape import get_model
    spec = replace(get_model(shared_tiny), dtype_bytes=4)
    measured = model_profile(spec, torch.device("cpu"), torch.float32)
    assert measured["shared_s"]["b"] > 0 and measured["model"]["n_shared_experts"] == 1


@pytest.mark.parametrize("policy", [{"name": "pregated", "capacity": 0.5},
                                    {"name": "moe_infinity", "capacity": 0.5, "miss": "reroute"}])
def test_replay_and_simulator_make_the_same_copies(tiny_trace_path, tmp_path, monkeypatch, policy):
    """A policy that prefetches every step: the replay's link (replay/link.py) issues exactly the
    simulator's copies, by kind, and its layers wait for them (stall measured, not modelled)."""
    from replay.engine import ReplayEngine
    from sim.engine import Engine
    engines = {}
    for cls, key in ((ReplayEngine, "replay"), (Engine, "sim")):
        run = cls.run

        def keep(self, run=run, key=key):
            engines[key] = self
            return run(self)
        monkeypatch.setattr(cls, "run", keep)
    rp = replay_scenario(scenario(tiny_trace_path, policy), "cpu")
    sim = run_scenario(load_scenario(rp.write(tmp_path / "rp") / "scenario.yaml"))
    for key in ("hits", "misses", "engine_steps"):
        assert rp.summary[key] == sim.summary[key], key
    # The same prefetches issued; how many the link dropped (their expert evicted before they
    # started) is the link's timing, and bytes_loaded counts only the copies that crossed it.
    issued = {k: r.summary["prefetches_ahead"] + r.summary["prefetches_dropped"] for k, r in (("rp", rp), ("sim", sim))}
    assert issued["rp"] == issued["sim"]
    for r in (rp, sim):
        s = r.summary
        assert s["expert_loads"] == s["misses"] + s["prefetches_ahead"] and s["expert_loads"] > 0
    assert rp.summary["bytes_loaded"] / rp.summary["expert_loads"] == sim.summary["bytes_loaded"] / \
        sim.summary["expert_loads"]                                   # the same model's expert
    link = engines["replay"].rt.cache.link.counts
    cost = engines["sim"].cost.copies
    initial = int(engines["replay"]._initial)
    assert link["prefetch"] == cost["prefetch"] > 0
    assert link["demand"] - initial == cost["demand"]
    assert (rp.timeline.expert_loads == sim.timeline.expert_loads).all()
    if cost["demand"]:      # a layer always waits for its demand copies; whether for prefetches is timing
        assert rp.timeline.stall_s.sum() > 0 and sim.timeline.stall_s.sum() > 0


def test_replay_runs_the_simulators_loop_on_the_wall_clock(tiny_trace_path):
    """One loop, two clocks: replayed, no request is admitted before it arrives in real time,
    and the run's clock ends at the wall time it took (SimPy's real-time environment)."""
    import time
    t0 = time.perf_counter()
    rp = replay_scenario(scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5},
                                  arrival={"process": "poisson", "rate": 20.0}, requests=6), "cpu")
    wall = time.perf_counter() - t0
    q = rp.requests
    assert q.completed.all() and (q.admitted_s >= q.arrival_s - 1e-9).all()
    assert q.arrival_s.max() <= rp.summary["simulated_time_s"] <= wall
    assert rp.summary["simulated_time_s"] >= q.finish_s.max()


def test_a_replay_stopped_at_a_limit_does_not_wait_for_later_arrivals(tiny_trace_path):
    """limits.max_steps ends the replay at once: the loop stops with serving, not after the
    last arrival has come in real time (the trace's arrivals here span about 5 s)."""
    import time
    sc = scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5},
                  arrival={"process": "poisson", "rate": 3.0}, requests=16)
    sc["limits"]["max_steps"] = 5
    t0 = time.perf_counter()
    rp = replay_scenario(sc, "cpu")
    wall = time.perf_counter() - t0
    assert rp.summary["engine_steps"] == 5 and rp.meta["stopped_early"]
    last_arrival = rp.requests.arrival_s.max()
    assert last_arrival > 2.0 and wall < last_arrival
    assert rp.summary["simulated_time_s"] < last_arrival


def test_cuda_layer_events_settle_into_wall_clock_seconds(monkeypatch):
    """On CUDA a layer's events are timing events on the device's clock, each read against the
    anchor taken before it was recorded (one a step): each step, those the device finished
    become seconds on time.monotonic (anchor + elapsed, end = start + duration); unfinished ones
    wait; recording stops after CUDA_LAYER_STEPS steps. No GPU here: stand-in events with the
    CUDA Event methods the cache calls."""
    import torch
    from replay import model
    from replay.model import ExpertCache

    class Ev:                        # device time t (s), finished or not
        def __init__(self, t, done=True):
            self.t, self.done = t, done

        def query(self):
            return self.done

        def elapsed_time(self, other):   # milliseconds from self to other, as torch.cuda.Event's
            return (other.t - self.t) * 1e3

    cache = ExpertCache([[torch.zeros(4)]], 2, torch.device("cpu"), torch.float32)
    cache.cuda, cache._steps_to_record = True, model.CUDA_LAYER_STEPS
    first, second = (Ev(5.0), 100.0), (Ev(7.0), 102.5)     # the second anchor: clocks drifted 0.5 s
    late = Ev(5.9, done=False)
    cache.events += [("attention", 0, None, (first, Ev(5.25)), (first, Ev(5.5))),
                     ("demand copy", 0, 3, (first, Ev(5.5)), (first, late))]
    anchors = iter([second] + [(Ev(8.0), 200.0)] * 50)
    monkeypatch.setattr(ExpertCache, "reanchor", lambda self: setattr(self, "_anchor", next(anchors)))
    cache.step_done()
    assert cache.events[0] == ("attention", 0, None, 100.25, 100.5)
    assert isinstance(cache.events[1][4][1], Ev)            # its copy had not finished: left as it was
    assert cache._anchor == second
    cache.events.append(("experts", 0, None, (second, Ev(7.25)), (second, Ev(7.5))))
    late.done = True
    cache.step_done()
    assert cache.events[1:] == [("demand copy", 0, 3, 100.5, 100.9), ("experts", 0, None, 102.75, 103.0)]
    assert cache._unsettled == [] and cache._settled_to == 3
    for _ in range(model.CUDA_LAYER_STEPS - 3):
        assert cache.recording
        cache.step_done()
    assert cache.recording
    cache.step_done()
    assert not cache.recording and cache.stamp() is None    # later steps record nothing
