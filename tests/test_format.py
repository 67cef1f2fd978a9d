import json
import zipfile

import numpy as np
import pytest

from traces.model_shape import get_model
from traces.format import TraceError, check_matches_model, load_trace, save_trace
from conftest import make_trace


def test_round_trip_keeps_everything(tmp_path, tiny_trace):
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    back = load_trace(p)
    for name in ("request_id", "task", "prompt_tokens", "output_tokens", "experts", "gates",
                 "arrival_s", "router_probs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tiny_trace, name))
    assert (back.model, back.n_layers, back.n_experts, back.top_k) == ("tiny", 4, 8, 2)
    assert back.extra["seed"] == 3
    np.testing.assert_array_equal(back.offsets, tiny_trace.offsets)


def test_round_trip_prompt_text_and_compression(tmp_path):
    t = make_trace(np.zeros((3, 1, 1)), [1, 1], [0, 1], prompt_text=np.array(["Summarize: a", "Solve: b"]))
    back = load_trace(save_trace(t, tmp_path / "t", compress=True))
    assert back.prompt_text.tolist() == ["Summarize: a", "Solve: b"]
    assert back.arrival_s is None and back.router_probs is None


def test_expert_id_out_of_range():
    t = make_trace([[[0, 1]], [[1, 7]]], [1], [1], n_experts=4)
    with pytest.raises(TraceError, match=r"expert id 7 out of range 0\.\.3.*request 'r0'"):
        t.validate()


def test_wrong_top_k():
    t = make_trace([[[0, 1]]], [1], [0])
    t.top_k = 3
    with pytest.raises(TraceError, match="2 experts per token but the trace says top_k=3"):
        t.validate()


def test_token_counts_disagree_with_routing():
    t = make_trace([[[0, 1]], [[1, 2]]], [1], [3])
    with pytest.raises(TraceError, match="hold 2 tokens but the token counts add up to 4"):
        t.validate()


def test_duplicate_expert_in_a_token():
    with pytest.raises(TraceError, match="same expert twice"):
        make_trace([[[1, 1]]], [1], [0]).validate()


def _rewrite(path, out, **changes):
    z = dict(np.load(path))
    meta = json.loads(str(z["meta"]))
    for k, v in changes.items():
        if k == "drop":
            z.pop(v)
        else:
            meta[k] = v
    z["meta"] = np.array(json.dumps(meta))
    np.savez(out, **z)
    return out


def test_unknown_version(tmp_path, tiny_trace):
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    bad = _rewrite(p, tmp_path / "v9.npz", version=9)
    with pytest.raises(TraceError, match="unknown trace version 9"):
        load_trace(bad)


def test_missing_field(tmp_path, tiny_trace):
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    bad = _rewrite(p, tmp_path / "nogates.npz", drop="gates")
    with pytest.raises(TraceError, match=r"missing field\(s\) \['gates'\]"):
        load_trace(bad)


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(TraceError, match="not a readable emoe trace"):
        load_trace(tmp_path / "junk.npz")


def test_failed_save_keeps_the_old_file(tmp_path, tiny_trace):
    p = save_trace(tiny_trace, tmp_path / "t.npz")
    before = p.read_bytes()
    bad = make_trace([[[0, 9]]], [1], [0])
    with pytest.raises(TraceError):
        save_trace(bad, p)
    assert p.read_bytes() == before
    assert zipfile.is_zipfile(p)
    assert [f.name for f in tmp_path.iterdir()] == ["t.npz"]  # no temp files left


def test_trace_must_match_model(tiny_trace):
    check_matches_model(tiny_trace, get_model("tiny"))
    with pytest.raises(TraceError, match="does not match model 'mixtral-8x7b'"):
        check_matches_model(tiny_trace, get_model("mixtral-8x7b"))


def test_subset(tiny_trace):
    s = tiny_trace.subset([2, 0])
    assert s.request_id.tolist() == [tiny_trace.request_id[2], tiny_trace.request_id[0]]
    np.testing.assert_array_equal(s.experts[: s.offsets[1]], tiny_trace.experts[tiny_trace.token_slice(2)])
    s.validate()
