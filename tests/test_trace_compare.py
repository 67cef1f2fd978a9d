"""`emoe trace compare`: statistics side by side with a verdict, at the smaller side's shape."""
import json

import numpy as np
import pytest

from sim.cli import main
from traces.compare import compare, compare_paths, flatten, grouped_stats
from traces.format import save_trace
from traces.stats import summary_stats
from traces.synth import synthesize


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    a = synthesize("tiny", ["code", "math"], 24, seed=1, output_mean=30)
    b = synthesize("tiny", ["code", "math"], 24, seed=2, output_mean=30, profile="paper")
    return save_trace(a, d / "a.npz"), save_trace(b, d / "b.npz"), a


def test_a_trace_against_itself_is_within_tolerance_everywhere(pair):
    pa, _, a = pair
    rep = compare_paths(pa, pa)
    assert rep["rows"] and all(r["verdict"] == "ok" and r["relative_difference"] == 0 for r in rep["rows"])


def test_verdicts_follow_the_tolerance():
    rows = compare({"request_gini": 0.2, "nmi_1": 0.5}, {"request_gini": 0.22, "nmi_1": 0.3}, tol=0.15)
    by = {r["key"]: r for r in rows}
    assert by["request_gini"]["verdict"] == "ok" and by["request_gini"]["relative_difference"] == pytest.approx(-1 / 11)
    assert by["nmi_1"]["verdict"] == "differs"
    assert compare({"nmi_1": 0.5}, {}, 0.15)[0]["verdict"] == "n/a"


def test_grouping_compares_at_the_smaller_shape(pair):
    _, _, a = pair
    g = grouped_stats(a, "all", 6)
    assert g["groups"] == 4
    direct = [flatten(summary_stats(a.subset(np.arange(i, i + 6)), "all"))["specialisation"] for i in (0, 6, 12, 18)]
    assert g["specialisation"] == pytest.approx(np.nanmean(direct))


def test_a_different_profile_is_told_apart(pair):
    pa, pb, _ = pair
    rep = compare_paths(pa, pb)
    bad = {r["key"] for r in rep["rows"] if r["verdict"] == "differs"}
    assert {"request_gini", "nmi_2"} <= bad       # paper: requests stray far, a one-step layer chain


def test_cli_compare_with_reference_and_json(tmp_path, pair, capsys):
    pa, _, _ = pair
    out = tmp_path / "c.json"
    assert main(["trace", "compare", str(pa), "reference:mixtral-8x7b-instruct", "--tokens", "decode",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per-request Gini of expert counts" in text and "statistics within tolerance" in text
    assert json.loads(out.read_text())["b"] == "reference:mixtral-8x7b-instruct"
    assert main(["trace", "compare", str(pa), "reference:nope"]) == 2
    assert "unknown reference 'nope'" in capsys.readouterr().err
    assert main(["trace", "compare", str(pa), "reference:mixtral-8x7b-instruct"]) == 2   # measured on decode tokens
    assert main(["trace", "compare", str(pa), str(tmp_path / "missing.json")]) == 2
