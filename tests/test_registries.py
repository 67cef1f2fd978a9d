"""What every registered component must do, checked for each one in its registry: a
predictor or hardware preset added later is covered without editing this file."""
import numpy as np
import pytest

from sim.costmodel import CostModel
from sim.hardware import PRESETS as HARDWARE
from traces.model_shape import get_model
from sim.policies.base import StepPlan
from sim.predictors import PREDICTORS, TRAINABLE, load_predictor, make_predictor
from traces.synth import synthesize


@pytest.fixture(scope="module")
def trace():
    return synthesize("tiny", ["qa", "code", "math"], 30, seed=3)


@pytest.mark.parametrize("kind", TRAINABLE)
def test_every_trainable_predictor_survives_its_file(trace, kind, tmp_path):
    """A trained predictor saved and loaded predicts exactly what it did before: a predictor
    file means the predictor that was trained (emoe predictor train -> policy.predictor_file)."""
    train = np.arange(20)
    p = make_predictor(kind).fit(trace, train)
    back = load_predictor(p.save(tmp_path / f"{kind}.npz"))
    history = [np.bincount((np.arange(trace.n_layers)[:, None] * trace.n_experts
                            + trace.experts[i]).ravel(), minlength=trace.n_layers * trace.n_experts)
               .reshape(trace.n_layers, trace.n_experts) for i in range(3)]
    for task in ("qa", "code", "unseen-task"):
        a, b = p.predict(task, history), back.predict(task, history)
        assert a.shape == (trace.n_layers, trace.n_experts)
        np.testing.assert_allclose(a, b)
    assert back.kind == kind and back.train_ids == p.train_ids


def test_every_predictor_kind_is_registered_under_its_own_name():
    for kind, cls in PREDICTORS.items():
        assert cls.kind == kind
    assert set(TRAINABLE) <= set(PREDICTORS)


@pytest.mark.parametrize("hw", sorted(HARDWARE))
@pytest.mark.parametrize("model", ["mixtral-8x7b", "olmoe-1b-7b"])
def test_every_hardware_preset_prices_copies_and_steps_as_physics_says(hw, model):
    """An expert's copy takes its bytes over the host link plus the link latency; a step with
    a demand copy takes longer than the same step without, by at most the copy."""
    m, h = get_model(model), HARDWARE[hw]
    cm = CostModel(m, h)
    assert cm.copy_s == pytest.approx(m.bytes_per_expert / h.h2d_bytes_per_s + h.h2d_latency_s)
    L, E = m.n_moe_layers, m.n_experts
    counts = np.zeros((L, E), dtype=np.int64)
    counts[:, :m.top_k] = 1
    hit = CostModel(m, h).step(0.0, StepPlan(counts=counts, demand=np.zeros(L, dtype=np.int64), prefetch=[],
                                            staged=0), 1, 1, 100, 100)
    demand = np.zeros(L, dtype=np.int64)
    demand[0] = 1
    miss = CostModel(m, h).step(0.0, StepPlan(counts=counts, demand=demand, prefetch=[], staged=0), 1, 1, 100, 100)
    assert hit.duration_s < miss.duration_s <= hit.duration_s + cm.copy_s + 1e-12
