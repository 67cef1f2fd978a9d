import json

import numpy as np
import pytest

from traces.format import TraceError
from traces.importer import import_jsonl


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for rid, task, ntok in [("p1", "math", 3), ("p2", "code", 2)]:
        for tok in range(ntok):
            for layer in range(4):
                ex = rng.choice(8, 2, replace=False).tolist()
                rows.append({"dataset": task, "problem_id": rid, "layer": layer, "token_idx": tok,
                             "experts": ex, "gating_probs": [0.7, 0.3], "prompt_tokens": 1})
    return rows


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_import_round_trip(tmp_path):
    rows = _rows()
    rng = np.random.default_rng(1)
    shuffled = [rows[i] for i in rng.permutation(len(rows))]   # order on disk must not matter
    t = import_jsonl(_write(tmp_path / "r.jsonl", shuffled), "tiny")
    assert sorted(t.request_id.tolist()) == ["p1", "p2"]
    by_id = {r: i for i, r in enumerate(t.request_id)}
    for r in rows:
        i = by_id[r["problem_id"]]
        row = t.offsets[i] + r["token_idx"]
        assert t.experts[row, r["layer"]].tolist() == r["experts"]
        assert t.gates[row, r["layer"]].tolist() == pytest.approx([0.7, 0.3], abs=1e-3)
    i = by_id["p1"]
    assert (t.task[i], t.prompt_tokens[i], t.output_tokens[i]) == ("math", 1, 2)


@pytest.mark.parametrize("mutate,msg", [
    (lambda r: r.update(experts=[0, 9]), "expert ids .* out of range 0..7"),
    (lambda r: r.update(experts=[0]), "'experts' must list top_k=2"),
    (lambda r: r.pop("layer"), "missing 'layer'"),
    (lambda r: r.update(layer=4), "layer 4 out of range"),
    (lambda r: r.pop("problem_id"), "missing 'request_id'"),
])
def test_bad_row_names_its_line(tmp_path, mutate, msg):
    rows = _rows()
    mutate(rows[5])
    with pytest.raises(TraceError, match=f"r.jsonl:6: {msg}"):
        import_jsonl(_write(tmp_path / "r.jsonl", rows), "tiny")


def test_missing_layer_and_bad_json(tmp_path):
    rows = _rows()
    del rows[1]
    with pytest.raises(TraceError, match=r"request 'p1' token 0 lacks layer\(s\) \[1\]"):
        import_jsonl(_write(tmp_path / "r.jsonl", rows), "tiny")
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(TraceError, match="b.jsonl:1: missing 'request_id'"):
        import_jsonl(tmp_path / "b.jsonl", "tiny")
