"""Capture from Hugging Face MoE checkpoints, on tiny random models of each architecture."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hfmodels import save_tiny
from sim.cli import main
from traces.capture import moe_modules, select, spec_from_config
from traces.format import check_matches_model, load_trace

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
PROMPTS = [{"task": "summarization", "prompt": "Summarize the dialogue: hello there"},
           {"task": "math", "prompt": "Solve the math problem: 3 + 4"},
           {"task": "code", "prompt": "def add(a, b):"}]


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_the_models_own_router(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = save_tiny(arch, tmp_path / arch)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "t.npz"
    assert main(["capture", "--model", str(d), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "5",
                 "--batch-size", "2", "-o", str(out)]) == 0
    t = load_trace(out)                               # passes validation
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    assert t.tasks == sorted({p["task"] for p in PROMPTS}) and t.router_probs is not None
    check_matches_model(t, spec_from_config(model.config, "m"))
    for i, p in enumerate(PROMPTS):
        prompt_ids = tok(p["prompt"], return_tensors="pt")["input_ids"]
        assert t.prompt_tokens[i] == prompt_ids.shape[1]
        # The generated tokens are the model's greedy continuation.
        with torch.no_grad():
            gen = model.generate(prompt_ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[0, prompt_ids.shape[1]:]
        assert t.output_tokens[i] <= 5 and t.output_tokens[i] == min(len(new), 5) or tok.eos_token_id in new.tolist()
        seq = gen[:, : prompt_ids.shape[1] + t.output_tokens[i]]
        with torch.no_grad():
            rl = model(seq, output_router_logits=True).router_logits
        rows = t.experts[t.token_slice(i)]
        for layer, (logits, mod) in enumerate(zip(rl, moe_modules(model))):
            want, _, _ = select(logits, model.config, mod)
            np.testing.assert_array_equal(rows[:, layer, :], want.numpy())


def test_bad_prompts_file(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["capture", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"),
                 "-o", str(tmp_path / "t.npz")]) == 2


SMALL = __import__("pathlib").Path(__file__).parent.parent / "traces" / "models" / "emoe-small-moe"


def test_trained_small_moe_loads_and_captures(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from traces.capture import capture
    model = AutoModelForCausalLM.from_pretrained(SMALL)
    tok = AutoTokenizer.from_pretrained(SMALL)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert 5e6 < sum(p.numel() for p in model.parameters()) < 2e7
    t = capture(model, tok, PROMPTS, max_new_tokens=4, batch_size=3)
    t.validate()
    assert (t.output_tokens <= 4).all() and t.n_layers == 4 and t.n_experts == 8


def test_shipped_captured_trace_shows_task_specialisation():
    from traces.stats import trace_stats
    t = load_trace(SMALL.parent.parent / "samples" / "emoe-small-moe-captured.npz")
    assert set(t.tasks) == {"math", "code", "qa", "summarization", "translation", "general"}
    s = trace_stats(t)
    assert s["specialisation"] > 0.02
    assert s["gini"] > 0.2
