"""Statistics on hand-made traces whose right answers are known by hand."""
import numpy as np
import pytest

from traces.stats import (effective_experts, gate_stats, gini, js_divergence, nmi, prompt_decode_divergence,
                          request_gini, request_nmi, reuse_by_layer, reuse_floor_by_layer, summary_stats,
                          token_mask, trace_stats)
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


# ---- structure statistics (issue 12), by hand ------------------------------------------


def test_per_request_gini_and_effective_experts():
    # Request 0 uses experts 0 and 1 equally at its one layer, request 1 only expert 2.
    counts = np.array([[[2, 2, 0, 0]], [[0, 0, 4, 0]]])
    assert request_gini(counts) == pytest.approx((0.5 + 0.75) / 2)     # Gini [2,2,0,0] = 0.5
    assert effective_experts(counts) == pytest.approx((2 + 1) / 2)      # exp(entropy): 2 and 1
    assert effective_experts(np.array([[[1, 1, 1, 1]]])) == pytest.approx(4)


def test_within_request_nmi_ignores_what_differs_between_requests():
    # In each request layer 1 copies layer 0 (NMI 1), but the mapping differs between the
    # requests, so pooled over both the layers are nearly independent.
    x = np.array([0, 1, 2, 3] * 4)
    a = np.stack([x, x], axis=1)[:, :, None]                 # request 0: same expert at both layers
    b = np.stack([x, (x + 1) % 4], axis=1)[:, :, None]       # request 1: shifted by one
    t = make_trace(np.concatenate([a, b]), [16, 16], [0, 0])
    assert request_nmi(t, token_mask(t), 1) == pytest.approx(1.0)
    assert trace_stats(t)["cross_layer_correlation"] < 0.8    # pooled: the mappings blur


def test_reuse_by_distance_and_by_layer():
    # Layer 0 alternates {0,1},{2,3}; layer 1 keeps {0,1}: distance 1 reuses nothing at layer 0,
    # distance 2 everything.
    ex = np.array([[[0, 1], [0, 1]], [[2, 3], [0, 1]]] * 4)
    t = make_trace(ex, [8], [0])
    r1, n1 = reuse_by_layer(t, token_mask(t), 1)
    r2, _ = reuse_by_layer(t, token_mask(t), 2)
    assert n1 == 7 and r1.tolist() == [0.0, 1.0] and r2.tolist() == [1.0, 1.0]
    s = summary_stats(t)
    assert s["reuse_by_distance"]["1"] == pytest.approx(0.5)
    assert s["reuse_first_layer"] == 0.0 and s["reuse_last_layers"] == 1.0
    # Shuffled, layer 0's 4 + 4 uses of two sets give sum n(n-1) = 4 * 4 * 3 over 8 * 7 pairs, / k.
    assert reuse_floor_by_layer(s_counts(t), 2)[0] == pytest.approx(4 * 4 * 3 / (8 * 7) / 2)


def s_counts(t):
    from traces.stats import request_counts
    return request_counts(t, token_mask(t))


def test_gate_quantiles_and_absent_gates():
    ex = np.array([[[0, 1]]] * 4)
    g = np.array([[[0.95, 0.05]], [[0.6, 0.4]], [[0.7, 0.3]], [[0.8, 0.2]]], dtype=np.float16)
    t = make_trace(ex, [4], [0], gates=g)
    s = gate_stats(t, token_mask(t))
    assert s["gate_top1_over_0_9"] == pytest.approx(0.25)
    assert s["gate_quantiles"]["0.5"] == pytest.approx(0.75, abs=1e-3)
    t.extra["gates"] = "absent"
    assert np.isnan(gate_stats(t, token_mask(t))["gate_top1_over_0_9"])


def test_prompt_decode_divergence_per_request():
    # Request 0: prompt on expert 0, decode on expert 1 (1 bit); request 1 routes alike (0 bits).
    ex = [[[0]], [[0]], [[1]], [[1]], [[2]], [[2]], [[2]], [[2]]]
    t = make_trace(ex, [2, 2], [2, 2])
    assert prompt_decode_divergence(t) == pytest.approx(0.5)
