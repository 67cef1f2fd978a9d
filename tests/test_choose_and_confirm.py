"""The README's command sequence from capture to a confirm verdict runs as documented, at
reduced size: fewer prompts and tokens, fewer replayed requests, a one-thread profile.

It is read from the README's "From capture to a confirmed policy" block and run in a copy of
the repository's layout (the shipped scenario and sweep files, the small MoE and its prompts),
so the documentation cannot drift from what works."""
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from sim.cli import CONFIRM_FAILED, main

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
# Reduced size: option -> value, and what confirm adds.
SMALLER = {"--max-new-tokens": "8", "-j": "1"}
CONFIRM_EXTRA = ["--threads", "1", "--max-copy-mb", "1", "--set", "workload.requests=6"]


def documented_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("From capture to a confirmed policy", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0]) for line in lines if line.strip().startswith("emoe ")]


def test_capture_sweep_choose_confirm_as_documented(tmp_path, monkeypatch, capsys):
    cmds = documented_commands()
    assert [c[1] for c in cmds] == ["capture", "sweep", "choose", "confirm"]
    # The repository's layout: shipped files copied, the model and prompts linked.
    for rel in ("scenarios/emoe-small-moe-captured.yaml", "scenarios/sweeps/choose-small-moe.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    (tmp_path / "traces").symlink_to(ROOT / "traces")
    prompts = (ROOT / "traces/prompts/heldout-open.jsonl").read_text().splitlines()
    by_task = {}
    for line in prompts:
        by_task.setdefault(json.loads(line)["task"], []).append(line)
    (tmp_path / "few.jsonl").write_text("\n".join(x for g in by_task.values() for x in g[:2]) + "\n")  # 2 a task
    monkeypatch.chdir(tmp_path)
    for cmd in cmds:
        args = cmd[1:]
        for opt, value in SMALLER.items():
            if opt in args:
                args[args.index(opt) + 1] = value
        if args[0] == "capture":
            args[args.index("--prompts") + 1] = "few.jsonl"
        if args[0] == "confirm":
            args += CONFIRM_EXTRA
        code = main(args)
        assert code in ((0, CONFIRM_FAILED) if args[0] == "confirm" else (0,)), (args, code)
    out = capsys.readouterr().out
    assert "chosen:" in out and "verdict: " in out
    captured = Path("runs/small-moe/captured.npz")
    chosen = yaml.safe_load(Path("runs/small-moe/chosen.yaml").read_text())
    from traces.format import read_meta
    shape = read_meta(captured)["model_shape"]
    # The chosen scenario names the captured model's shape (from the trace, nobody wrote it) ...
    assert {k: chosen["model"][k] for k in ("hidden", "n_experts", "dtype_bytes")} == \
        {k: shape[k] for k in ("hidden", "n_experts", "dtype_bytes")}
    # ... and confirm simulated what the CPU replay ran: that model in float32.
    conf = Path("runs/small-moe/confirm")
    sim = yaml.safe_load((conf / "sim" / "scenario.yaml").read_text())
    assert sim["model"]["hidden"] == shape["hidden"] and sim["model"]["dtype_bytes"] == 4
    report = json.loads((conf / "comparison.json").read_text())
    assert [r["check"] for r in report["verdict"]] == ["latency", "throughput", "memory", "ttft"]
    assert (conf / "verdict.txt").read_text().strip().splitlines()[-1].startswith("verdict: ")
