"""Importers for what serving engines record (tests/data/import/, written by
tests/data/make_import_samples.py): each format as written, the damaged dumps real
profilers produce, strict errors naming the line, and --repair with its report."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from traces.format import TraceError, load_trace
from traces.importer import detect_format, import_trace
from traces.stats import request_nmi, token_mask

DATA = Path(__file__).parent / "data" / "import"
sys.path.insert(0, str(DATA.parent))
import make_import_samples as samples


@pytest.fixture(scope="module")
def source():
    return samples.sample_trace()


def routing_of(t, rid):
    i = t.request_id.tolist().index(rid)
    return t.experts[t.token_slice(i)]


def test_shipped_samples_are_what_the_script_writes(tmp_path):
    for p in samples.write_all(tmp_path):
        assert p.read_bytes() == (DATA / p.name).read_bytes(), f"{p.name}: rerun tests/data/make_import_samples.py"


@pytest.mark.parametrize("name,fmt", [("rows.jsonl", "rows"), ("vllm-responses.jsonl", "vllm"),
                                      ("vllm-offline.jsonl", "vllm"), ("megatron-router-trace.jsonl", "megatron")])
def test_format_detected(name, fmt):
    assert detect_format(DATA / name) == fmt


def test_rows_round_trip(source):
    t, rep = import_trace(DATA / "rows.jsonl", "tiny")
    np.testing.assert_array_equal(t.experts, source.experts)
    np.testing.assert_allclose(t.gates.astype(float), source.gates.astype(float), atol=1e-3)
    assert t.prompt_tokens.tolist() == source.prompt_tokens.tolist()        # from is_prompt flags
    assert not rep.repairs and t.extra["import"]["format"] == "rows"


def test_vllm_responses_and_offline_outputs(source):
    t, rep = import_trace(DATA / "vllm-offline.jsonl", "tiny")
    np.testing.assert_array_equal(t.experts, source.experts)
    assert t.task.tolist() == source.task.tolist() and t.prompt_text[1] == "prompt 1"
    assert t.arrival_s.tolist() == [0.0, 0.5, 1.0, 1.5]                     # relative to the first
    assert t.extra["gates"] == "absent"                                      # vLLM returns ids only
    r, _ = import_trace(DATA / "vllm-responses.jsonl", "tiny")
    # Two completions of one prompt share its routing; the second's generated tokens are request 1's.
    assert r.request_id.tolist()[:2] == ["cmpl-0:0", "cmpl-0:1"]
    p = int(source.prompt_tokens[0])
    np.testing.assert_array_equal(routing_of(r, "cmpl-0:1")[:p], routing_of(source, "r000000")[:p])
    gen1 = routing_of(source, "r000001")[source.prompt_tokens[1]:]
    np.testing.assert_array_equal(routing_of(r, "cmpl-0:1")[p:], gen1)
    assert r.task[0] == source.task[0]                                       # from metadata.task


def test_megatron_steps_become_requests(source):
    t, rep = import_trace(DATA / "megatron-router-trace.jsonl", "tiny", task="code")
    assert t.request_id.tolist() == ["megatron-router-trace:0", "megatron-router-trace:1"]
    P = int(min(source.prompt_tokens[:2]))
    for b in range(2):
        src = routing_of(source, f"r00000{b}")
        got = routing_of(t, f"megatron-router-trace:{b}")
        np.testing.assert_array_equal(got[:P], src[:P])                   # prefill, sequence-major
        np.testing.assert_array_equal(got[P:], src[source.prompt_tokens[b]:][:len(got) - P])
    assert set(t.task.tolist()) == {"code"} and any("MTP" in n for n in rep.notes)


# ---- the damaged dumps -----------------------------------------------------------------
def test_tie_dropped_rows_strict_then_repaired(source):
    with pytest.raises(TraceError, match=r"rows-tie-dropped.jsonl:\d+: request 'r000000' layer 0 ends at token "
                                         r"\d+.*renumbered.*--repair"):
        import_trace(DATA / "rows-tie-dropped.jsonl", "tiny")
    t, rep = import_trace(DATA / "rows-tie-dropped.jsonl", "tiny", repair=True)
    assert t.n_tokens == source.n_tokens and t.request_id.tolist() == source.request_id.tolist()
    dropped = len(samples.rows_records(source)) - len(samples.tie_dropped(samples.rows_records(source)))
    assert rep.filled_routes == dropped == t.extra["import"]["filled_routes"]
    assert "realigned layer" in t.extra["import"]["repairs"]
    same = (t.experts == source.experts).all(axis=2).mean()
    assert same > 0.9, f"only {same:.0%} of routes back in place"


def test_realignment_keeps_cross_layer_structure(tmp_path):
    """The issue's measurement: truncating each request to its shortest layer corrupts the
    cross-layer NMI; realigning keeps it."""
    from traces.synth import synthesize
    src = synthesize("mixtral-8x7b", ["code"], 3, seed=4, output_mean=150, prompt_mean=20)
    rows = samples.tie_dropped(samples.rows_records(src), rate=0.01, seed=1)
    path = tmp_path / "dump.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t, rep = import_trace(path, "mixtral-8x7b", repair=True)
    nmi_src = request_nmi(src, token_mask(src), 1)
    nmi_rep = request_nmi(t, token_mask(t), 1)
    # The workaround: cut every layer to the request's shortest one, indices as written.
    cut = src.experts.copy()
    for r in range(src.n_requests):
        recs = [x for x in rows if x["problem_id"] == src.request_id[r]]
        n = min(sum(1 for x in recs if x["layer"] == l) for l in range(src.n_layers))
        for x in recs:
            if x["token_idx"] < n:
                cut[src.offsets[r] + x["token_idx"], x["layer"]] = x["experts"]
        cut[src.offsets[r] + n:src.offsets[r + 1]] = cut[src.offsets[r] + n - 1]
    truncated = src.subset(np.arange(src.n_requests))
    truncated.experts = cut
    nmi_cut = request_nmi(truncated, token_mask(truncated), 1)
    print(f"NMI source {nmi_src:.3f}, repaired {nmi_rep:.3f}, truncated {nmi_cut:.3f}")
    assert abs(nmi_rep - nmi_src) < 0.02 < nmi_src - nmi_cut


def test_constant_positions_strict_then_write_order(source):
    with pytest.raises(TraceError, match=r"rows-constant-position.jsonl:\d+: request 'r000000' token 0 layer 0 "
                                         r"given twice \(first on line 1\).*token_pos.*--repair"):
        import_trace(DATA / "rows-constant-position.jsonl", "tiny")
    t, rep = import_trace(DATA / "rows-constant-position.jsonl", "tiny", repair=True)
    np.testing.assert_array_equal(t.experts, source.experts)
    assert len(rep.repairs["write order"]) == source.n_requests


def test_repeated_problem_id_is_namespaced(source):
    with pytest.raises(TraceError, match=r"rows-repeated-id.jsonl:\d+: request '0' was task 'code' \(line 1\), "
                                         r"now 'math'.*--repair"):
        import_trace(DATA / "rows-repeated-id.jsonl", "tiny")
    t, rep = import_trace(DATA / "rows-repeated-id.jsonl", "tiny", repair=True)
    assert {"code/0", "math/0"} <= set(t.request_id.tolist())
    np.testing.assert_array_equal(routing_of(t, "code/0"), routing_of(source, "r000000"))
    assert rep.repairs["repeated request id"][0]["request"] == "0"


def test_missing_route_marker(source):
    with pytest.raises(TraceError, match=r"vllm-offline-missing-route.jsonl:2: expert id -1 \(token \d+\).*--repair"):
        import_trace(DATA / "vllm-offline-missing-route.jsonl", "tiny")
    t, rep = import_trace(DATA / "vllm-offline-missing-route.jsonl", "tiny", repair=True)
    assert rep.filled_routes == 1
    row = t.offsets[1] + t.prompt_tokens[1] + 2
    np.testing.assert_array_equal(t.experts[row, 1], t.experts[row - 1, 1])     # from the token before


def test_megatron_step_lacking_a_layer(tmp_path):
    lines = (DATA / "megatron-router-trace.jsonl").read_text().splitlines()
    drop = next(i for i, x in enumerate(lines) if json.loads(x)["step"] == 3 and json.loads(x)["layer"] == 2)
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines[:drop] + lines[drop + 1:]) + "\n")
    with pytest.raises(TraceError, match=r"m.jsonl:\d+: step 3 lacks router layer\(s\) \[2\]"):
        import_trace(path, "tiny")
    t, rep = import_trace(path, "tiny", repair=True)
    assert rep.filled_routes == 2                                          # one route per request


@pytest.mark.parametrize("text,fmt,msg", [
    ('{"foo": 1}\n', "auto", r"cannot tell the format.*--format"),
    ('{"step": 0, "layer": 0, "top_indices": [[0, 9]]}\n', "megatron",
     r"bad.jsonl:1: expert id 9 \(token 0\) out of range 0..7"),
    ('{"id": "a", "prompt_routed_experts": [[[0, 1]]], "choices": [{"routed_experts": []}]}\n', "vllm",
     r"'prompt_routed_experts' has shape \[1, 1, 2\], expected \[tokens, 4, 2\]"),
    ('{"id": "a", "choices": [{"routed_experts": "AAAA"}], "prompt_routed_experts": []}\n', "vllm", r"base64"),
])
def test_bad_records_name_their_line(tmp_path, text, fmt, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(TraceError, match=msg):
        import_trace(p, "tiny", fmt)


def test_cli_import_repair_prints_report_and_keeps_provenance(tmp_path, capsys):
    from sim.cli import main
    out = tmp_path / "t.npz"
    assert main(["trace", "import", str(DATA / "rows-tie-dropped.jsonl"), "--model", "tiny", "-o", str(out)]) == 2
    assert "--repair" in capsys.readouterr().err
    assert not out.exists()
    assert main(["trace", "import", str(DATA / "rows-tie-dropped.jsonl"), "--model", "tiny", "--repair",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repaired realigned layer" in printed and "routes filled" in printed
    t = load_trace(out)
    assert t.extra["import"]["repaired"] is True and t.extra["import"]["filled_routes"] > 0
