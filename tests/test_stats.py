"""Statistics on hand-made traces whose right answers are known by hand."""
import numpy as np
import pytest

from traces.stats import gini, js_divergence, nmi, trace_stats
from conftest import make_trace


def test_gini_known_values():
    assert gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 8]) == pytest.approx(0.75)      # (n-1)/n for all mass on one
    assert gini([1, 3]) == pytest.approx(0.25)            # |1-3| * 2 / (2 * 4 * 2)


def test_temporal_reuse_by_hand():
    # One layer, top-2, 3 tokens: {0,1} -> {1,2} -> {1,2}: reuse 1/2 then 2/2.
    t = make_trace([[[0, 1]], [[1, 2]], [[2, 1]]], [1], [2])
    assert trace_stats(t)["temporal_reuse"] == pytest.approx(0.75)
    # Across a request boundary nothing counts: two requests of one token each.
    t2 = make_trace([[[0, 1]], [[0, 1]]], [1, 1], [0, 0])
    assert np.isnan(trace_stats(t2)["temporal_reuse"])


def test_cross_layer_nmi_by_hand():
    x = np.array([0, 1, 2, 3] * 25)
    assert nmi(x, (x + 1) % 4, 4) == pytest.approx(1.0)   # layer l+1 determined by layer l
    x, y = np.tile(np.arange(4), 4), np.repeat(np.arange(4), 4)   # every pair once
    assert nmi(x, y, 4) == pytest.approx(0.0, abs=1e-12)  # independent
    ex = np.stack([x, (x + 1) % 4], axis=1)[:, :, None]   # (T, 2 layers, top-1)
    t = make_trace(ex, [8], [8])
    assert trace_stats(t)["cross_layer_correlation"] == pytest.approx(1.0)


def test_inter_prompt_correlation_and_specialisation():
    # Requests 0 and 1 (task a) route identically; request 2 (task b) uses other experts.
    a = [[[0]], [[1]], [[1]]]
    b = [[[2]], [[3]], [[3]]]
    t = make_trace(a + a + b, [3, 3, 3], [0, 0, 0], tasks=["a", "a", "b"])
    s = trace_stats(t)
    assert s["per_task"]["a"]["inter_prompt_correlation"] == pytest.approx(1.0)
    assert np.isnan(s["per_task"]["b"]["inter_prompt_correlation"])   # no pair
    assert s["inter_prompt_correlation"] == pytest.approx(1.0)
    assert s["specialisation"] == pytest.approx(1.0)                   # disjoint support: 1 bit
    assert s["per_task"]["a"]["distinct_experts"] == pytest.approx(2.0)
    assert js_divergence(np.array([1., 1]), np.array([2., 2])) == pytest.approx(0.0)


def test_phase_selection():
    # Prompt tokens use expert 0, generated tokens expert 1.
    t = make_trace([[[0]], [[0]], [[1]], [[1]]], [2], [2])
    assert trace_stats(t, "prompt")["tokens"] == 2
    assert trace_stats(t, "decode")["gini"] == pytest.approx(0.75)
    assert trace_stats(t, "all")["gini"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tokens must be"):
        trace_stats(t, "nope")


def test_json_keys_present(tiny_trace):
    s = trace_stats(tiny_trace)
    for key in ("inter_prompt_correlation", "cross_layer_correlation", "temporal_reuse", "gini"):
        assert isinstance(s[key], float)
        assert set(s["per_task"]) == {"qa", "code"}
        assert key in s["per_task"]["qa"]
