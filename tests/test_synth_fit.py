"""`emoe trace fit`: a generator profile fitted to a real trace reproduces its statistics,
round-trips through YAML, and drives `emoe trace synth` deterministically."""
from dataclasses import replace

import numpy as np
import pytest

from sim.cli import main
from traces.compare import compare, flatten
from traces.errors import UserError
from traces.fit import fit_profile, solve_gate_map
from traces.format import load_trace, save_trace
from traces.profile import PROFILES, load_profile, save_profile
from traces.stats import summary_stats
from traces.synth import synthesize

# A "real" trace with structure the fit must find: a strong context in the middle layers,
# a path across layers, requests that stray from their task.
TRUTH = replace(PROFILES["real"], name="truth", path_strength=(1.5, 3.0, 3.0, 2.0), context_share=(0.1, 0.8, 0.8, 0.5),
                context_persistence=0.7, request_deviation=0.8, gate_temperature=1.3, gate_power=0.8)


@pytest.fixture(scope="module")
def real():
    return synthesize("tiny", ["code", "math"], 40, seed=5, profile=TRUTH, prompt_mean=30, output_mean=40)


@pytest.fixture(scope="module")
def fitted(real):
    return fit_profile(real, rounds=12, seed=1)


def test_fit_reproduces_the_real_statistics(real, fitted):
    syn = synthesize(None, None, None, seed=9, profile=fitted, like=real)
    rows = compare(flatten(summary_stats(syn)), flatten(summary_stats(real)), tol=0.15)
    bad = [(r["key"], round(r["relative_difference"], 3)) for r in rows if r["verdict"] == "differs"]
    assert not bad, f"outside 15%: {bad}"
    assert fitted.fit["rms_relative_error"] < 0.1 and fitted.fit["gates"] == "fitted"


def test_fitted_tables_carry_shape_tasks_and_lengths(real, fitted):
    assert fitted.shape == dict(name="tiny", n_layers=4, n_experts=8, top_k=2, n_shared_experts=0)
    assert set(fitted.tasks) == {"code", "math"}
    code = fitted.tasks["code"]
    assert code["weight"] == pytest.approx(np.mean(real.task == "code"))
    assert code["output"]["mean"] == pytest.approx(real.output_tokens[real.task == "code"].mean())
    assert np.asarray(code["popularity"]["decode"]).shape == (4, 8)


def test_profile_yaml_round_trip_and_synth_from_file(tmp_path, fitted):
    path = save_profile(fitted, tmp_path / "p.yaml")
    back = load_profile(path)
    for k, v in fitted.knobs().items():
        assert np.allclose(np.asarray(getattr(back, k), float), np.asarray(v, float), atol=1e-5), k
    a = synthesize(None, None, 30, seed=3, profile=str(path))
    b = synthesize(None, None, 30, seed=3, profile=str(path))
    np.testing.assert_array_equal(a.experts, b.experts)                   # deterministic per seed
    assert set(a.task.tolist()) <= {"code", "math"} and a.model == "tiny"
    c = synthesize(None, None, 30, seed=4, profile=str(path))
    assert not np.array_equal(a.prompt_tokens, c.prompt_tokens)


def test_like_copies_the_shape(real, fitted):
    syn = synthesize("tiny", None, None, seed=2, profile=fitted, like=real)
    assert syn.task.tolist() == real.task.tolist()
    assert syn.prompt_tokens.tolist() == real.prompt_tokens.tolist()
    assert syn.output_tokens.tolist() == real.output_tokens.tolist()


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["knobs"].update(warp=1), r"unknown knob\(s\) \['warp'\]"),
    (lambda d: d["tasks"]["code"]["popularity"].update(decode=[[1.0]]), r"task 'code' decode popularity has shape"),
    (lambda d: d.update(format="other"), r"not an emoe routing profile"),
    (lambda d: d.update(version=7), r"profile version 7"),
])
def test_bad_profiles_are_one_clear_line(tmp_path, fitted, edit, msg):
    import yaml
    path = save_profile(fitted, tmp_path / "p.yaml")
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=msg):
        load_profile(path)


def test_fitted_profile_refuses_another_model_and_unknown_tasks(fitted):
    with pytest.raises(UserError, match="was fitted on 4 layers x 8 experts"):
        synthesize("mixtral-8x7b", None, 3, profile=fitted)
    with pytest.raises(UserError, match="unknown task.*'poetry'.*fitted on code, math"):
        synthesize(None, ["poetry"], 3, profile=fitted)


def test_gate_map_hits_its_quantiles():
    rng = np.random.default_rng(0)
    gaps = np.stack([np.zeros(20000), rng.exponential(1.0, 20000)], axis=1)
    temp, power = solve_gate_map(gaps, [(0.5, 0.7), (0.9, 0.9)])
    share = 1 / np.exp(-gaps ** power / temp).sum(axis=1)
    assert np.quantile(share, 0.5) == pytest.approx(0.7, abs=2e-3)
    assert np.quantile(share, 0.9) == pytest.approx(0.9, abs=2e-3)


def test_cli_fit_then_synth(tmp_path, real, capsys):
    src = save_trace(real, tmp_path / "real.npz")
    prof = tmp_path / "p.yaml"
    assert main(["trace", "fit", str(src), "-o", str(prof), "--rounds", "3"]) == 0
    assert "rms relative error" in capsys.readouterr().out
    out = tmp_path / "s.npz"
    assert main(["trace", "synth", "--profile", str(prof), "--like", str(src), "-o", str(out)]) == 0
    assert load_trace(out).n_requests == real.n_requests
    assert main(["trace", "synth", "--profile", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "t.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
