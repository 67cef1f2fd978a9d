"""The one meaning of the interval p (sim/demand.py), shared by the eMoE policy and `emoe accuracy`."""
import numpy as np
import pytest

from sim.demand import Arrival, coming_demand, invocation_due
from sim.policies import make_policy
from sim.request import Request
from traces.model_shape import get_model

F = {"qa": np.tile([0.5, 0.5, 0, 0], (2, 1)), "code": np.tile([0, 0, 0.25, 0.75], (2, 1))}


def shares(task, arrivals):
    return F.get(task)


def test_demand_is_the_last_p_arrivals_scaled_to_p_prompts():
    recent = [Arrival("qa", 10, 5), Arrival("code", 30, 10), Arrival("qa", 20, 5)]
    # p = 2: only the last two count (code 30 + 10, qa 20 + 5), scaled by p / n = 1.
    N = coming_demand(recent, 2, (2, 4), shares)
    np.testing.assert_allclose(N[0], [12.5, 12.5, 10, 30])
    # p = 6 with three arrivals so far: all three, scaled by 6 / 3 to six prompts.
    N = coming_demand(recent, 6, (2, 4), shares)
    np.testing.assert_allclose(N[0], 2 * np.array([20, 20, 10, 30]))
    # Token weighting off: one per prompt (the ablation).
    np.testing.assert_allclose(coming_demand(recent, 3, (2, 4), shares, task_aware=False)[0], [1, 1, 0.25, 0.75])


def test_demand_skips_unknown_tasks_and_insensitive_layers():
    recent = [Arrival("qa", 10, 0), Arrival("math", 1000, 0)]      # nothing known of math
    s = {"qa": np.array([0.0, 1.0])}
    N = coming_demand(recent, 2, (2, 4), shares, sensitivity=s.get)
    assert (N[0] == 0).all() and N[1].tolist() == [5, 5, 0, 0]
    assert coming_demand([], 4, (2, 4), shares).sum() == 0


def test_invocations_every_p_arrivals_from_the_first():
    assert [n for n in range(1, 12) if invocation_due(n, 5)] == [1, 6, 11]
    assert all(invocation_due(n, 1) for n in range(1, 5))


def test_policy_predicts_from_arrived_prompts_only():
    """The eMoE policy's demand is coming_demand over its last p arrivals (identified tasks)."""
    tiny = get_model("tiny")
    pol = make_policy({"name": "emoe", "capacity": 0.25, "skip": False, "interval": 2}, tiny, None, 0)
    f = {"qa": np.tile(np.eye(8)[0], (4, 1)), "code": np.tile(np.eye(8)[1], (4, 1))}
    pol.predictor.prior = f
    arrivals = [("qa", 10), ("code", 50), ("code", 70)]
    for i, (task, p) in enumerate(arrivals):
        pol.on_arrival(Request(index=i, rid=f"r{i}", task=task, prompt_tokens=p, output_tokens=5, row0=0,
                               arrival_s=0.0, slo={}, expected_output=5.0), 0.0)
    N = pol.expected_tokens()
    # The first qa prompt left the window of p = 2: only code (50 + 5 + 70 + 5) remains.
    assert N[0, 0] == 0 and N[0, 1] == pytest.approx(130)
    expected = coming_demand([Arrival(t, p, 5.0) for t, p in arrivals], 2, (4, 8), lambda t, a: f[t])
    np.testing.assert_allclose(N, expected)
    assert pol.pending is True and pol.arrivals == 3    # arrivals 1 and 3 are invocations at p = 2
