"""`emoe profile` measures robustly on a busy machine: interleaved repeats, medians with
outliers dropped, a fixed thread count the replay reuses, and its own noise recorded."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from replay.profile import NOISY, interleaved, robust


def test_a_burst_of_other_work_does_not_move_the_estimate():
    steady = [1.00, 1.01, 0.99, 1.00, 1.02, 0.98, 1.00, 1.01, 0.99]
    burst = steady[:6] + [3.0, 4.0, 3.5]          # three rounds slowed by another job
    assert robust(burst)[0] == pytest.approx(robust(steady)[0], rel=0.02)
    assert np.mean(burst) > 1.5                    # what a mean would have said
    assert robust(steady)[1] < NOISY               # steady: trusted
    assert robust([1, 2, 1, 2, 1.5, 1, 2, 1.5])[1] > NOISY   # noisy all along: flagged


def test_interleaved_rounds_spread_a_slow_spell_over_every_case():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    interleaved(fns, torch.device("cpu"), rounds=3, warmup=0)
    # Round r starts at case r: no case always runs first (or last) in its round.
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_profile_records_threads_spread_and_load(tmp_path, capsys):
    from sim.cli import main
    import yaml
    out = tmp_path / "p.yaml"
    assert main(["profile", "--device", "cpu", "--max-copy-mb", "1", "--threads", "1", "-o", str(out)]) == 0
    err = capsys.readouterr().err          # each stage announced as it starts (minutes on a CPU)
    assert "profile 1/2" in err and "profile 2/2" in err     # no scenario: no calibration replay
    prof = yaml.safe_load(out.read_text())
    m = prof["measured"]
    assert m["threads"] == 1 and prof["info"]["threads"] == 1
    # Prompt chunks' attention context measured apart; the replay's KV block recorded for the ledger.
    from replay.model import KV_BLOCK_TOKENS
    assert m["attention_s"]["e"] >= 0 and m["kv_block_tokens"] == KV_BLOCK_TOKENS
    assert set(m["spread"]) >= {"copies", "expert_s", "attention_s"}
    assert all(v >= 0 for v in m["spread"].values())
    assert isinstance(prof["info"]["noisy"], dict)


def test_copy_line_is_fitted_in_relative_terms_and_passes_through_the_expert_copy():
    from replay.profile import fit_copy_line, through_expert_copy
    sizes = np.array([2 ** p for p in range(12, 27, 2)], dtype=float)
    lat, bw = 20e-6, 5e9
    t = lat + sizes / bw
    t[-1] *= 1.3                     # one slow large copy: a fit in seconds would move the latency by ms
    got_lat, got_bw = fit_copy_line(sizes, t)
    assert got_lat == pytest.approx(lat, rel=0.25)
    # The simulator copies one size: the line goes exactly through its measured copy.
    for expert_s in (1e-3, 1e-5):    # slower than the line, and faster than its latency allows
        l2, b2 = through_expert_copy(got_lat, got_bw, 1.4e6, expert_s)
        assert l2 > 0 and l2 + 1.4e6 / b2 == pytest.approx(expert_s)


def test_step_fit_recovers_the_cost_models_fixed_terms():
    import pandas as pd
    from replay.profile import fit_step_overhead, layer_seconds
    measured = {"model": {"top_k": 2}, "attention_s": {"a": 1e-4, "b": 1e-6, "c": 1e-8, "d": 5e-5, "e": 2e-8},
                "expert_s": {"a": 2e-4, "b": 1e-6, "layer": 0.0}}
    rng = np.random.default_rng(0)
    batch = np.repeat(np.arange(24, 0, -1), 6)          # a batch shrinking as its requests finish ...
    sizes = np.array([64, 200, 128, 400, 256])[np.arange(len(batch)) // 10 % 5]
    prefill = np.where(np.arange(len(batch)) % 10 == 3, sizes, 0)   # ... and a prompt chunk now and then
    tl = pd.DataFrame({"tokens": batch + prefill, "sampled": batch, "batch_requests": batch,
                       "attn_ctx": batch * 300.0, "active_experts": np.minimum(batch * 2, 8) * 4,
                       "prefill_tokens": prefill, "stall_s": 0.002 * (prefill > 0),
                       "prefill_ctx": prefill * (prefill + 1) / 2})
    layers = layer_seconds(measured, tl, 4)
    # The prompt chunks' context is priced by e where the timeline has it (older ones: not).
    assert (layers - layer_seconds(measured, tl.drop(columns="prefill_ctx"), 4)).max() == pytest.approx(
        4 * 2e-8 * tl.prefill_ctx.max())
    # The cost model's fixed_s: a + b * sampled + c * tokens (all tokens), plus the waits for copies,
    # and prompt chunks' attention beyond what the profile's cases priced (1e-8 per layer and context).
    step = layers + 3e-3 + 4e-4 * tl.sampled + 5e-5 * tl.tokens + tl.stall_s + rng.normal(0, 1e-5, len(tl)) \
        + 4 * 1e-8 * tl.prefill_ctx
    step[5::17] += 0.05                                   # a few steps delayed by a burst of other work
    tl["t_s"] = np.concatenate([[0.0], np.cumsum(step)[:-1]])
    tl["step_s"] = step
    fit = fit_step_overhead(measured, tl, 4)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((3e-3, 4e-4, 5e-5), rel=0.05)
    assert fit["prefill_e"] == pytest.approx(1e-8, rel=0.05)
    # A step after which the engine idled until an arrival says nothing about the step: left out.
    idle = tl.copy()
    idle.loc[40:, "t_s"] += 5.0
    assert fit_step_overhead(measured, idle, 4)["a"] == pytest.approx(3e-3, rel=0.05)
