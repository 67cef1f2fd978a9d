"""Expert restriction on a real (tiny) model: accuracy, sensitivity, and the simulator's estimate."""
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from hfmodels import save_tiny
from sim import quality
from sim.cli import main

PROMPTS = [{"task": t, "prompt": p, "reference": r} for t, p, r in [
    ("math", "Solve the math problem: 3 + 4\\nAnswer: ", "3 + 4 = 7. The answer is 7."),
    ("math", "Solve the math problem: 5 + 6\\nAnswer: ", "5 + 6 = 11. The answer is 11."),
    ("qa", "Answer the question: who wrote the odyssey?\\nAnswer: ", "Homer"),
    ("qa", "Answer the question: who built the pyramids?\\nAnswer: ", "the ancient Egyptians"),
    ("code", "def add(a, b):", " return a + b"),
    ("code", "def sub(a, b):", " return a - b")]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    save_tiny("mixtral", d / "mix")
    p = d / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return d / "mix", p


def test_accuracy_all_experts_is_exact_and_restriction_costs(tiny, tmp_path):
    model, prompts = tiny
    out = tmp_path / "acc.json"
    assert main(["accuracy", "--model", str(model), "--prompts", str(prompts), "--policy", "random",
                 "--capacity", "0.5,1.0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    full = [r for r in rows if r["capacity"] == 1.0]
    half = [r for r in rows if r["capacity"] == 0.5]
    assert all(r["agreement"] == 1.0 and r["routing_fidelity"] == 1.0 for r in full)
    assert all(abs(r["perplexity"] - r["perplexity_all_experts"]) < 1e-3 * r["perplexity"] for r in full)
    assert np.mean([r["routing_fidelity"] for r in half]) < 1.0
    assert np.mean([r["agreement"] for r in half]) < 1.0
    # The simulator's quality estimate from these measurements.
    calib = quality.from_accuracy_json(out, "tiny-mixtral")
    assert quality.estimate(calib, "math", 1.0) == pytest.approx(1.0)
    assert quality.estimate(calib, "unknown-task", 0.0) <= 1.0


def test_emoe_first_prompt_runs_with_every_expert(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replay.quality import accuracy
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    tok = AutoTokenizer.from_pretrained(tiny[0])
    res = accuracy(model, tok, PROMPTS[:1], "emoe", 0.5, 1)
    assert res["math"]["agreement"] == 1.0 and res["math"]["routing_fidelity"] == 1.0


def test_sensitivity_writes_a_table_the_policy_reads(tiny, tmp_path):
    model, prompts = tiny
    out = tmp_path / "sens.yaml"
    assert main(["sensitivity", "--model", str(model), "--prompts", str(prompts), "--threshold", "0.5",
                 "-o", str(out)]) == 0
    from sim.sensitivity import load_sensitivity
    table = load_sensitivity(str(out), 2)
    for task in ("math", "qa", "code"):
        assert set(table.row(task).tolist()) <= {0.0, 1.0}
    import yaml
    data = yaml.safe_load(out.read_text())
    assert len(data["measured"]["math"]) == 2 and data["threshold"] == 0.5


def test_prompts_need_references(tmp_path, tiny):
    p = tmp_path / "p.jsonl"
    p.write_text('{"task": "qa", "prompt": "x"}\n')
    assert main(["accuracy", "--model", str(tiny[0]), "--prompts", str(p)]) == 2


def test_isotonic_fit():
    y = quality.isotonic(np.array([0.1, 0.5, 0.3, 0.4, 0.9]))
    assert np.all(np.diff(y) >= 0) and y.tolist() == pytest.approx([0.1, 0.4, 0.4, 0.4, 0.9])


def test_emoe_accuracy_never_uses_prompts_that_have_not_arrived(tiny):
    """Two prompt streams that agree up to prompt 2 give prompts 0..2 the same experts: the
    set chosen at an invocation comes from prompts that have arrived, never from later ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replay.quality import accuracy, prompt_records
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    tok = AutoTokenizer.from_pretrained(tiny[0])
    math0, math1, qa0, qa1, code0, _ = PROMPTS
    a = [math0, qa0, math1, code0]
    b = [math0, qa0, math1, qa1]
    for p in (1, 2, 40):
        ra = list(prompt_records(model, tok, a, "emoe", 0.5, p))
        rb = list(prompt_records(model, tok, b, "emoe", 0.5, p))
        for x, y in zip(ra[:3], rb[:3]):
            assert (x["allowed"] is None) == (y["allowed"] is None)
            if x["allowed"] is not None:
                assert (x["allowed"] == y["allowed"]).all()
            assert x["fidelity"] == y["fidelity"] and x["agree"] == y["agree"]
        assert accuracy(model, tok, a, "emoe", 0.5, p)["math"] == accuracy(model, tok, b, "emoe", 0.5, p)["math"]
        # Only the first prompt runs unrestricted; the next predicts at once, whatever p.
        assert ra[0]["allowed"] is None and all(r["allowed"] is not None for r in ra[1:])
