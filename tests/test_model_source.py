"""A trace records its model's shape (an optional meta field: version-1 traces without it
read as before), and a scenario can take its model from the trace (`model: from_trace`) or
from a checkpoint's config.json (`model: {hf_config: DIR}`) instead of written dimensions."""
import json
from dataclasses import asdict

import numpy as np
import pytest

from sim.cli import main
from sim.scenario import ScenarioError, load_scenario
from traces.format import TraceError, load_trace, read_meta, save_trace
from traces.model_shape import get_model

SMALL = __import__("pathlib").Path(__file__).parent.parent / "traces" / "models" / "emoe-small-moe"
SHAPE = {**asdict(get_model("tiny")), "name": "tiny-captured", "dtype_bytes": 4}


def test_model_shape_round_trips_and_old_traces_read_as_before(tmp_path, tiny_trace):
    # Written without the field, a trace's meta is what it always was (no model_shape key).
    plain = save_trace(tiny_trace, tmp_path / "plain.npz")
    assert "model_shape" not in read_meta(plain) and load_trace(plain).model_shape is None
    tiny_trace.model_shape = dict(SHAPE)
    p = save_trace(tiny_trace, tmp_path / "shaped.npz")
    t = load_trace(p)
    assert t.model_shape == SHAPE and read_meta(p)["model_shape"] == SHAPE
    assert t.subset([0, 2]).model_shape == SHAPE          # a workload's selection keeps it
    # A recorded shape that did not route this trace is refused, naming the field.
    tiny_trace.model_shape = {**SHAPE, "n_experts": 16}
    with pytest.raises(TraceError, match="n_experts 16 vs 8"):
        save_trace(tiny_trace, tmp_path / "bad.npz")


def test_scenario_model_from_trace(tmp_path, tiny_trace):
    tiny_trace.model_shape = dict(SHAPE)
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    sc = load_scenario(data={"model": "from_trace", "workload": {"trace": str(p)}})
    assert sc["model"] == SHAPE and get_model(sc["model"]).dtype_bytes == 4
    # Overrides apply over the recorded shape, as `--set model.x=...` does.
    over = load_scenario(data={"model": "from_trace", "workload": {"trace": str(p)}}, overrides=["model.dtype_bytes=2"])
    assert over["model"] == {**SHAPE, "dtype_bytes": 2}
    # The resolved scenario (what results and sweep points record) has explicit fields and runs again.
    from sim.scenario import dump
    import yaml
    (tmp_path / "r.yaml").write_text(dump(sc))
    assert load_scenario(tmp_path / "r.yaml")["model"] == SHAPE
    assert yaml.safe_load(dump(sc))["model"]["hidden"] == 64


def test_from_trace_without_a_recorded_shape_is_one_clear_error(tmp_path, tiny_trace, capsys):
    p = save_trace(tiny_trace, tmp_path / "old.npz")
    with pytest.raises(ScenarioError, match="records no model shape"):
        load_scenario(data={"model": "from_trace", "workload": {"trace": str(p)}})
    with pytest.raises(ScenarioError, match="needs workload.trace"):
        load_scenario(data={"model": "from_trace", "workload": {"synthetic": {"tasks": ["qa"], "requests": 2}}})
    (tmp_path / "s.yaml").write_text(f"model: from_trace\nworkload: {{trace: {p}}}\n")
    assert main(["run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no model shape" in err[0]
    assert not (tmp_path / "out").exists()


def test_scenario_model_from_hf_config(tmp_path):
    sc = load_scenario(data={"model": {"hf_config": str(SMALL)},
                             "workload": {"synthetic": {"tasks": ["qa"], "requests": 2}}})
    m = get_model(sc["model"])
    cfg = json.loads((SMALL / "config.json").read_text())
    assert (m.hidden, m.expert_ffn, m.n_layers, m.n_experts, m.top_k, m.n_heads, m.n_kv_heads, m.vocab) == (
        cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_local_experts"],
        cfg["num_experts_per_tok"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"])
    assert m.tied_embeddings and m.dtype_bytes == 2 and m.name == "emoe-small-moe"
    # The shipped scenario's hand-written dimensions are the checkpoint's.
    hand = get_model(load_scenario(SMALL.parent.parent.parent / "scenarios" / "emoe-small-moe.yaml")["model"])
    assert {k: v for k, v in asdict(hand).items() if k != "source"} == \
        {k: v for k, v in asdict(m).items() if k != "source"}
    # Relative to the scenario file; a directory without config.json is named.
    (tmp_path / "s.yaml").write_text("model: {hf_config: nowhere}\nworkload: {synthetic: {tasks: [qa], requests: 2}}\n")
    with pytest.raises(ScenarioError, match="nowhere.*no config.json"):
        load_scenario(tmp_path / "s.yaml")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ScenarioError, match="not supported"):
        load_scenario(data={"model": {"hf_config": str(tmp_path / "bad")},
                            "workload": {"synthetic": {"tasks": ["qa"], "requests": 2}}})


def test_capture_records_the_checkpoints_shape(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hfmodels import save_tiny
    d = save_tiny("mixtral", tmp_path / "m")
    (tmp_path / "p.jsonl").write_text(json.dumps({"task": "qa", "prompt": "who wrote the odyssey"}) + "\n")
    out = tmp_path / "t.npz"
    assert main(["capture", "--model", str(d), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "3",
                 "-o", str(out)]) == 0
    t = load_trace(out)
    sc = load_scenario(data={"model": "from_trace", "workload": {"trace": str(out)}})
    via_config = load_scenario(data={"model": {"hf_config": str(d)}, "workload": {"trace": str(out)}})
    same = lambda m: {k: v for k, v in m.items() if k != "source"}
    assert same(sc["model"]) == same(via_config["model"]) == same(t.model_shape)
    assert (t.model_shape["n_moe_layers"], t.model_shape["n_experts"]) == (t.n_layers, t.n_experts)
    assert np.array_equal(load_trace(out).experts, t.experts)
