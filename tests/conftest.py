import os

# One intra-op thread for torch (read when torch is first imported): on a shared 2-core machine
# two OpenMP threads spin-wait for each other and a tiny replay step takes 0.5 s instead of 25 ms
# (measured: a 444-step replay, 211 s with two threads under load vs 12 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from traces.format import Trace


def make_trace(experts, prompt, output, n_experts=4, tasks=None, gates=None, **kw):
    """A trace from an explicit (T, L, k) expert array: for hand-checkable tests."""
    experts = np.asarray(experts, dtype=np.uint8)
    T, L, k = experts.shape
    R = len(prompt)
    if gates is None:
        gates = np.full((T, L, k), 1.0 / k, dtype=np.float16)
    return Trace(model="hand", n_layers=L, n_experts=n_experts, top_k=k, request_id=[f"r{i}" for i in range(R)],
                 task=tasks or ["t"] * R, prompt_tokens=prompt, output_tokens=output, experts=experts, gates=gates,
                 **kw)


@pytest.fixture
def tiny_trace():
    from traces.synth import synthesize
    return synthesize("tiny", ["qa", "code"], 12, seed=3, rate=1.0, router_probs=True)


@pytest.fixture(scope="session")
def tiny_trace_path(tmp_path_factory):
    from traces.format import save_trace
    from traces.synth import synthesize
    t = synthesize("tiny", ["qa", "code", "math"], 40, seed=4, router_probs=True)
    return save_trace(t, tmp_path_factory.mktemp("traces") / "tiny.npz")


@pytest.fixture(autouse=True)
def _no_user_quality_calibration(monkeypatch):
    """A developer's EMOE_QUALITY_CALIBRATION must not change what the tests see."""
    monkeypatch.delenv("EMOE_QUALITY_CALIBRATION", raising=False)
