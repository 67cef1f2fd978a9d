import pytest

from traces.model_shape import PRESETS, get_model


@pytest.mark.parametrize("name,params_b", [
    ("mixtral-8x7b", 46.7), ("mixtral-8x22b", 140.6), ("olmoe-1b-7b", 6.9),
    ("qwen1.5-moe-a2.7b", 14.3), ("qwen3-30b-a3b", 30.5), ("deepseek-v2-lite", 15.7)])
def test_presets_match_published_parameter_counts(name, params_b):
    assert PRESETS[name].total_params / 1e9 == pytest.approx(params_b, rel=0.01)


def test_derived_sizes_mixtral():
    m = get_model("mixtral-8x7b")
    assert m.bytes_per_expert == 3 * 4096 * 14336 * 2
    assert m.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert m.dense_bytes + m.expert_bytes_total == m.total_params * 2


def test_explicit_model_and_errors():
    m = get_model({"preset": "tiny", "n_experts": 16, "name": "tiny16"})
    assert m.n_experts == 16 and m.hidden == 64
    with pytest.raises(KeyError, match="unknown model preset 'nope'"):
        get_model("nope")
    with pytest.raises(KeyError, match="unknown model key"):
        get_model({"preset": "tiny", "experts": 3})
    with pytest.raises(KeyError, match="missing required"):
        get_model({"hidden": 8})
    with pytest.raises(ValueError, match="top_k"):
        get_model({"preset": "tiny", "top_k": 9})
