import json
import subprocess
import sys

import pytest

from sim.cli import main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("trace", "models"):
        assert cmd in out


def test_synth_info_stats_plot(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    assert main(["trace", "synth", "--model", "tiny", "--tasks", "qa:2,code", "--requests", "10",
                 "--seed", "1", "--rate", "0.5", "-o", str(trace)]) == 0
    assert main(["trace", "info", str(trace)]) == 0
    assert "10 requests" in capsys.readouterr().out
    js = tmp_path / "s.json"
    assert main(["trace", "stats", str(trace), "--json", str(js), "--plot", str(tmp_path / "plots")]) == 0
    s = json.loads(js.read_text())
    assert {"gini", "temporal_reuse", "cross_layer_correlation", "inter_prompt_correlation", "per_task"} <= set(s)
    assert (tmp_path / "plots" / "popularity.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "transitions.png").stat().st_size > 1000


def test_import_via_cli(tmp_path):
    rows = [{"task": "qa", "request_id": 1, "layer": l, "token_idx": 0, "experts": [0, 1],
             "gating_probs": [0.5, 0.5]} for l in range(4)]
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["trace", "import", str(src), "--model", "tiny", "-o", str(tmp_path / "t.npz")]) == 0
    assert main(["trace", "import", str(src), "--model", "mixtral-8x7b", "-o", str(tmp_path / "m.npz")]) == 2


@pytest.mark.parametrize("argv,msg", [
    (["trace", "info", "missing.npz"], "does not exist"),
    (["trace", "synth", "--model", "nope", "-o", "x.npz"], "unknown model preset 'nope'"),
    (["trace", "synth", "--model", "tiny", "--tasks", "poetry", "-o", "x.npz"], "unknown task"),
    (["trace", "synth", "--model", "tiny", "--knob", "wobble=1", "-o", "x.npz"], "--knob"),
])
def test_bad_input_is_one_clear_line(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


def test_console_script_and_sim_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import sim, sim.cli, traces.model_shape, traces.format, traces.synth, traces.stats, traces.importer\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("installed", [True, False])
def test_version_prints_the_package_and_code_versions(installed, capsys, monkeypatch):
    import importlib.metadata
    import tomllib
    from pathlib import Path

    from sim.results import code_version
    if not installed:   # a checkout never pip-installed: the version is pyproject's
        def missing(name):
            raise importlib.metadata.PackageNotFoundError(name)
        monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"emoe {version} (code {code_version()})"
