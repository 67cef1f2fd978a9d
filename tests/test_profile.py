"""`emoe profile` measures robustly on a busy machine: interleaved repeats, medians with
outliers dropped, a fixed thread count the replay reuses, and its own noise recorded."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from replay.profile import NOISY, interleaved, robust  # noqa: E402


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


def test_profile_records_threads_spread_and_load(tmp_path):
    from sim.cli import main
    import yaml
    out = tmp_path / "p.yaml"
    assert main(["profile", "--device", "cpu", "--max-copy-mb", "1", "--threads", "1", "-o", str(out)]) == 0
    prof = yaml.safe_load(out.read_text())
    m = prof["measured"]
    assert m["threads"] == 1 and prof["info"]["threads"] == 1
    assert set(m["spread"]) >= {"copies", "expert_s", "attention_s"}
    assert all(v >= 0 for v in m["spread"].values())
    assert isinstance(prof["info"]["noisy"], dict)
