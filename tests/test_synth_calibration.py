"""The generator's defaults measure like real routing (traces/realdata.py)."""
import numpy as np
import pytest

from traces.compare import compare, grouped_stats
from traces.fit import reference_template
from traces.realdata import (PAPER_FIGURES, REAL_DECODE_TRACE, REAL_MIXTRAL_STRUCTURE, REFERENCE_SHAPE, TASKS,
                             measured_popularity)
from traces.stats import inter_prompt_correlation, popularity, request_counts, request_gini, token_mask, trace_stats
from traces.synth import synthesize

# Tolerance around the measured ranges: sampling noise of an 80-request trace.
TOL = {"gini": 0.02, "top_share": 0.015, "temporal_reuse": 0.02, "cross_layer_correlation": 0.02,
       "inter_prompt_correlation": 0.04}


@pytest.fixture(scope="module")
def real_code_math():
    # Like the real decode traces: code and math prompts, 80-255 generated tokens.
    return synthesize("mixtral-8x7b", ["code", "math"], 80, seed=11)


def _per_request(t):
    """Gini and top-k share of each request's expert counts per layer, averaged (how
    REAL_DECODE_TRACE's gini and top_share were measured; see traces/realdata.py)."""
    c = request_counts(t, token_mask(t, "decode")).astype(float)
    srt = np.sort(c, axis=2)[:, :, ::-1]
    return dict(gini=request_gini(c), top_share=float((srt[:, :, :t.top_k].sum(2) / srt.sum(2)).mean()))


@pytest.mark.parametrize("key", list(REAL_DECODE_TRACE))
def test_real_profile_matches_real_mixtral_decode_traces(real_code_math, key):
    s = dict(trace_stats(real_code_math, "decode"), **_per_request(real_code_math))
    lo, hi = REAL_DECODE_TRACE[key]
    assert lo - TOL[key] <= s[key] <= hi + TOL[key], f"{key}={s[key]:.3f} outside [{lo}, {hi}] +- {TOL[key]}"


@pytest.fixture(scope="module")
def reference_shape_stats():
    """The `real` profile at the shape the issue-12 figures were measured at, 30 replicas."""
    t = synthesize("mixtral-8x7b", None, None, seed=7, like=reference_template(30, seed=7))
    return grouped_stats(t, REFERENCE_SHAPE["tokens"], len(REFERENCE_SHAPE["tasks"]))


@pytest.mark.parametrize("key", list(REAL_MIXTRAL_STRUCTURE))
def test_real_profile_matches_the_real_structure_within_15_percent(reference_shape_stats, key):
    rows = {r["key"]: r for r in compare(reference_shape_stats, REAL_MIXTRAL_STRUCTURE, tol=0.15)}
    r = rows[key]
    assert r["verdict"] == "ok", (f"{r['statistic']}: {r['a']:.3f} vs real {r['b']:.3f} "
                                  f"({r['relative_difference']:+.0%})")


def test_decode_lengths_like_the_real_traces(real_code_math):
    assert real_code_math.output_tokens.min() >= 80 and real_code_math.output_tokens.max() <= 255


def test_measured_layers_follow_routing_stats():
    """At layers 0, 7, 15 each task's expert shares follow its routing-stats domain (generated
    tokens; prompt tokens stray from them by the profile's phase shift)."""
    t = synthesize("mixtral-8x7b", ["code", "summarization"], 300, seed=5, output_mean=40)
    pop = popularity(t, "decode")
    for task, p in pop.items():
        meas = measured_popularity("mixtral-8x7b", TASKS[task].domain)
        assert set(meas) == {0, 7, 15}
        for layer, share in meas.items():
            tv = 0.5 * np.abs(p[layer] - share).sum()
            assert tv < 0.05, f"{task} layer {layer}: total variation {tv:.3f} from routing-stats"


def test_olmoe_measured_layers():
    t = synthesize("olmoe-1b-7b", ["code"], 120, seed=2, output_mean=60)
    p = popularity(t, "decode")["code"]
    for layer, share in measured_popularity("olmoe-1b-7b", "github").items():
        assert 0.5 * np.abs(p[layer] - share).sum() < 0.08


def test_paper_profile_reaches_paper_recurrence():
    t = synthesize("mixtral-8x7b", ["code", "math"], 160, seed=11, profile="paper")
    s = trace_stats(t, "decode")
    lo, hi = PAPER_FIGURES["inter_prompt_correlation"]
    assert lo <= s["inter_prompt_correlation"] <= hi
    # ... and recurrence fades with distance: a prompt and its 20th successor ~0.5.
    counts = request_counts(t, token_mask(t, "decode"))
    lo, hi = PAPER_FIGURES["successor_correlation"]
    assert lo - 0.06 <= inter_prompt_correlation(t, counts, lag=20) <= hi + 0.06
    real = trace_stats(synthesize("mixtral-8x7b", ["code", "math"], 80, seed=11), "decode")
    assert s["cross_layer_correlation"] > real["cross_layer_correlation"]


def test_same_seed_same_trace_and_shared_structure():
    a = synthesize("tiny", ["qa", "math"], 20, seed=7)
    b = synthesize("tiny", ["qa", "math"], 20, seed=7)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.gates, b.gates)
    c = synthesize("tiny", ["qa", "math"], 20, seed=8)
    assert not np.array_equal(a.prompt_tokens, c.prompt_tokens)


def test_tasks_specialise_and_lengths_differ():
    t = synthesize("mixtral-8x7b", ["qa", "conversation"], 200, seed=1)
    s = trace_stats(t)
    assert s["specialisation"] > 0.01
    qa, conv = t.output_tokens[t.task == "qa"], t.output_tokens[t.task == "conversation"]
    assert np.percentile(qa, 90) < np.percentile(conv, 90)
    assert t.output_tokens.max() <= 1000


def test_gates_and_router_probs_are_consistent():
    t = synthesize("tiny", ["qa"], 5, seed=0, router_probs=True)
    g = t.gates.astype(float)
    assert np.allclose(g.sum(axis=2), 1, atol=1e-2)
    assert (g[:, :, 0] >= g[:, :, 1] - 1e-3).all()            # rank order
    probs = t.router_probs.astype(float)
    chosen = np.take_along_axis(probs, t.experts.astype(int), axis=2)
    assert (chosen[:, :, 0] >= probs.max(axis=2) - 1e-3).all()  # top-1 has the largest prob


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        synthesize("tiny", ["poetry"], 2)
    with pytest.raises(ValueError, match="unknown profile"):
        synthesize("tiny", ["qa"], 2, profile="nope")
