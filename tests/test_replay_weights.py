"""Replay with real weights: the project's small MoE checkpoint, its own router, greedy tokens."""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from replay.compare import compare_generations
from replay.run import replay_scenario
from replay.weights import WeightsError
from sim.cli import main
from sim.scenario import load_scenario
from traces.format import load_trace

ROOT = Path(__file__).parent.parent
WEIGHTS = ROOT / "traces" / "models" / "emoe-small-moe"
SCENARIO = ROOT / "scenarios" / "emoe-small-moe.yaml"


def replay(policy=None, requests=6, **kw):
    sc = load_scenario(SCENARIO, overrides=[f"workload.requests={requests}"])
    if policy:
        sc["policy"] = policy
    return replay_scenario(sc, "cpu", weights=str(WEIGHTS), **kw)


def generations(res):
    return {g["request_id"]: g["generated_ids"] for g in map(json.loads, res.files["generations.jsonl"].splitlines())}


@pytest.fixture(scope="module")
def resident():
    return replay({"name": "resident"})


def test_real_weights_generate_what_transformers_generates(resident):
    """RoPE, attention, norms, router and experts loaded right: greedy tokens equal the
    Hugging Face model's own greedy generation (float32) for every prompt."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(WEIGHTS), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(WEIGHTS))
    trace = load_trace(ROOT / "traces" / "samples" / "emoe-small-moe-captured.npz")
    gens = generations(resident)
    assert len(gens) == 6
    for rid, ids in gens.items():
        i = list(trace.request_id).index(rid)
        assert len(ids) == trace.output_tokens[i]
        enc = tok(str(trace.prompt_text[i]), return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=len(ids), do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert ids[:len(ref)] == ref.tolist(), rid      # HF stops at EOS; the replay runs the trace's length
    s = resident.summary
    # The trace was captured in bfloat16, the replay runs float32: nearly every route agrees.
    assert 0.93 < s["router_agreement"] <= 1.0
    assert s["router_misses"] == 0 and s["requests_completed"] == 6


def test_fetching_policy_keeps_outputs_and_counts_unplanned_picks(resident):
    res = replay({"name": "on_demand", "capacity": 0.5})
    assert generations(res) == generations(resident)     # every pick served: same tokens
    s = res.summary
    assert s["expert_loads"] > 0 and s["router_reroutes"] == 0
    # Picks the trace-driven policy did not serve are the router's disagreements with the trace.
    assert 0 <= s["router_misses"] <= (1 - s["router_agreement"]) * s["router_routes"] + 1


def test_rerouting_policy_changes_outputs(resident, tmp_path, capsys):
    res = replay({"name": "on_demand", "capacity": 0.25, "miss": "reroute"})
    assert res.summary["router_reroutes"] > 0
    assert generations(res) != generations(resident)
    a, b = resident.write(tmp_path / "full"), res.write(tmp_path / "reroute")
    same = compare_generations(a, a)
    assert same["generations_identical"] == 1.0 and same["generation_prefix_agreement"] == 1.0
    diff = compare_generations(a, b)
    assert diff["requests_compared"] == 6 and diff["generations_identical"] < 1.0
    assert 0.0 <= diff["generation_prefix_agreement"] < 1.0
    main(["compare", str(a), str(b)])
    assert "generated tokens (6 requests)" in capsys.readouterr().out


def test_weights_errors_name_the_problem(tmp_path):
    sc = load_scenario(SCENARIO, overrides=["model.hidden=128"])
    with pytest.raises(WeightsError, match="hidden: scenario 128, checkpoint 256"):
        replay_scenario(sc, "cpu", weights=str(WEIGHTS))
    sc = load_scenario(SCENARIO, overrides=["workload.tasks=[translation]"])
    with pytest.raises(WeightsError, match="no prompt text"):
        replay_scenario(sc, "cpu", weights=str(WEIGHTS))
    with pytest.raises(WeightsError, match="drop --scale"):
        replay_scenario(load_scenario(SCENARIO), "cpu", scale=2, weights=str(WEIGHTS))
    with pytest.raises(WeightsError, match="no config.json"):
        replay_scenario(load_scenario(SCENARIO), "cpu", weights=str(tmp_path))


def test_cli_replay_with_weights_writes_generations(tmp_path, capsys):
    out = tmp_path / "r"
    main(["replay", str(SCENARIO), "--weights", str(WEIGHTS), "-o", str(out), "--set", "workload.requests=3"])
    assert "real router" in capsys.readouterr().out
    assert len((out / "generations.jsonl").read_text().splitlines()) == 3
    assert "router_agreement" in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe"])
def test_each_supported_layout_generates_what_transformers_generates(arch, tmp_path):
    """Tiny random checkpoints of each layout the loader reads (QK-norm over the whole
    projection for OLMoE and per head for Qwen3, top-k weights kept or renormalised)."""
    from dataclasses import asdict

    from hfmodels import save_tiny
    from replay.weights import checkpoint_spec, read_config
    from traces.capture import capture
    from traces.format import save_trace
    d = save_tiny(arch, tmp_path / arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    prompts = [{"task": "qa", "prompt": "who wrote the odyssey"},
               {"task": "math", "prompt": "Solve the math problem: 3 + 4"},
               {"task": "code", "prompt": "def add(a, b): return a + b"}]
    trace = capture(model, tok, prompts, max_new_tokens=6, batch_size=1)
    save_trace(trace, tmp_path / "trace.npz")
    spec = asdict(checkpoint_spec(read_config(d), arch))
    sc = load_scenario(data={"name": arch, "model": spec, "hardware": {"preset": "a100-40gb"},
                             "workload": {"trace": str(tmp_path / "trace.npz"), "arrival": {"process": "batch"}},
                             "policy": {"name": "on_demand", "capacity": 0.5},
                             "limits": {"max_batch_tokens": 64, "max_running": 2}})
    res = replay_scenario(sc, "cpu", weights=str(d))
    for i, p in enumerate(prompts):
        enc = tok(p["prompt"], return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=int(trace.output_tokens[i]), do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:]
        assert generations(res)[f"p{i:05d}"][:len(ref)] == ref.tolist(), (arch, i)
    assert res.summary["router_agreement"] > 0.99     # float32 both sides: the same routes
    assert res.summary["expert_loads"] > 0


def test_shared_expert_checkpoints_are_refused(tmp_path):
    from hfmodels import save_tiny
    d = save_tiny("qwen2_moe", tmp_path / "q2")
    with pytest.raises(WeightsError, match="not supported"):
        replay_scenario(load_scenario(SCENARIO), "cpu", weights=str(d))
