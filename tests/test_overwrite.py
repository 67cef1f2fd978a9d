"""One overwrite rule for every command that writes: an output file, or a directory with anything
in it, that exists is refused (exit 2, one line naming --force, nothing changed), and replaced
with --force. Sweep directories are the exception: they are reused to resume."""
import hashlib
import json
import shutil

import pytest
import yaml

from sim.cli import main
from simhelpers import TINY_HW

SCENARIO = {"name": "t", "seed": 1, "model": "tiny", "hardware": dict(TINY_HW),
            "workload": {"trace": "tiny.npz", "requests": 4, "arrival": {"process": "poisson", "rate": 20.0}},
            "policy": {"name": "on_demand", "capacity": 0.5}, "limits": {"max_batch_tokens": 256, "max_running": 16}}
ROWS = [{"task": "qa", "request_id": 1, "layer": layer, "token_idx": 0, "experts": [0, 1],
         "gating_probs": [0.5, 0.5]} for layer in range(4)]

# (command, the output it writes): each runs in a directory holding tiny.npz, s.yaml, rows.jsonl,
# acc.json, pred.npz (a predictor of tiny.npz) and res/ (a results directory).
RUNNABLE = [
    (["trace", "synth", "--model", "tiny", "--tasks", "qa", "--requests", "3", "-o", "out.npz"], "out.npz"),
    (["trace", "import", "rows.jsonl", "--model", "tiny", "-o", "out.npz"], "out.npz"),
    (["trace", "stats", "tiny.npz", "--json", "out.json"], "out.json"),
    (["trace", "stats", "tiny.npz", "--plot", "figs"], "figs"),
    (["trace", "compare", "tiny.npz", "tiny.npz", "--json", "out.json"], "out.json"),
    (["trace", "fit", "tiny.npz", "--rounds", "1", "--replicas", "1", "-o", "prof.yaml"], "prof.yaml"),
    (["run", "s.yaml", "-o", "out"], "out"),
    (["capacity", "s.yaml", "--json", "out.json"], "out.json"),
    (["plot", "res", "-o", "figs"], "figs"),
    (["calibrate-quality", "acc.json", "--model-name", "m", "-o", "cal.yaml"], "cal.yaml"),
    (["predictor", "train", "tiny.npz", "--kind", "frequency", "-o", "p.npz"], "p.npz"),
    (["predictor", "eval", "pred.npz", "tiny.npz", "--json", "out.json"], "out.json"),
]
# Commands that need torch, a checkpoint or a corpus: the refusal comes before any of them loads.
REFUSED_EARLY = [
    (["capture", "--model", "m", "--prompts", "p.jsonl", "-o", "out.npz"], "out.npz"),
    (["prompts", "--data", "nowhere", "-o", "out.jsonl"], "out.jsonl"),
    (["accuracy", "--model", "m", "--prompts", "p.jsonl", "--json", "out.json"], "out.json"),
    (["sensitivity", "--model", "m", "--prompts", "p.jsonl", "-o", "out.yaml"], "out.yaml"),
    (["profile", "-o", "out.yaml"], "out.yaml"),
    (["replay", "s.yaml", "-o", "res"], "res"),
    (["confirm", "s.yaml", "-o", "res"], "res"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sim.predictors import make_predictor
    from traces.format import save_trace
    from traces.synth import synthesize
    d = tmp_path_factory.mktemp("assets")
    tr = synthesize("tiny", ["qa", "code"], 6, seed=2)
    save_trace(tr, d / "tiny.npz")
    make_predictor("frequency").fit(tr, [0, 1, 2]).save(d / "pred.npz")
    (d / "s.yaml").write_text(yaml.safe_dump(SCENARIO))
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (d / "acc.json").write_text(json.dumps([{"task": "qa", "routing_fidelity": 0.6, "agreement": 0.5}]))
    cwd = pytest.MonkeyPatch.context()
    with cwd as m:
        m.chdir(d)
        assert main(["run", "s.yaml", "-o", "res"]) == 0
    return d


@pytest.fixture
def here(assets, tmp_path, monkeypatch):
    shutil.copytree(assets, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def digests(path):
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def a_file_of(path):
    return path if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[0]


def refused(argv, capsys):
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--force" in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("argv,out", RUNNABLE, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_an_existing_output_is_refused_and_replaced_with_force(argv, out, here, capsys):
    assert main(argv) == 0
    out = here / out
    a_file_of(out).write_text("stale")   # what --force must replace
    before = digests(out)
    refused(argv, capsys)
    assert digests(out) == before, "a refused command changed its output"
    assert main(argv + ["--force"]) == 0
    assert a_file_of(out).read_text(errors="replace") != "stale"
    assert not [p for p in here.iterdir() if p.name.startswith(".")], "a temporary or set-aside file was left"


@pytest.mark.parametrize("argv,out", REFUSED_EARLY, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_an_existing_output_is_refused_before_anything_loads(argv, out, here, capsys):
    if not (here / out).exists():
        (here / out).write_text("precious")
    before = digests(here / out)
    refused(argv, capsys)
    assert digests(here / out) == before


def test_force_replaces_only_a_directory_emoe_wrote(here, capsys):
    (here / "mine").mkdir()
    (here / "mine" / "notes.txt").write_text("mine")
    assert main(["run", "s.yaml", "-o", "mine", "--force"]) == 2
    assert "not a results directory emoe wrote" in capsys.readouterr().err
    assert (here / "mine" / "notes.txt").read_text() == "mine"


def test_a_failed_run_with_force_keeps_the_earlier_results(here, monkeypatch):
    from sim.run import RunResult
    before = digests(here / "res")

    def broken(self, out):
        (out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
        raise KeyError("a bug while writing")
    monkeypatch.setattr(RunResult, "write", broken)
    with pytest.raises(KeyError):
        main(["run", "s.yaml", "-o", "res", "--force"])
    assert digests(here / "res") == before
    assert not [p for p in here.iterdir() if p.name.startswith(".")]


def test_runs_without_o_each_get_a_new_directory(here, capsys):
    """The default name carries the time and a random token: two runs in the same second do not
    meet (the second used to be refused, or would have written into the first's directory)."""
    from sim.cli.common import default_results_dir
    assert default_results_dir("t") != default_results_dir("t")
    assert main(["run", "s.yaml"]) == 0
    assert main(["run", "s.yaml"]) == 0
    made = sorted((here / "runs").iterdir())
    assert len(made) == 2 and all(p.name.startswith("t-") and (p / "summary.json").exists() for p in made)
