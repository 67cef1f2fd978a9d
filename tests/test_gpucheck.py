"""The GPU check's whole flow, shrunk to run on a CPU: it must not rot before a GPU session uses it."""
import json

import pytest

pytest.importorskip("torch")


def test_gpucheck_flow_on_cpu(tmp_path):
    from replay.gpucheck import main
    main(["-o", str(tmp_path), "--device", "cpu", "--scale", "128", "--requests", "4", "--rate", "50",
          "--calibration-requests", "4", "--max-copy-mb", "1", "--policies", "resident,emoe"])
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert set(report["runs"]) == {"resident", "emoe"}
    for run in report["runs"].values():
        metrics = {row["metric"]: row for row in run["comparison"]}
        assert metrics["requests_completed"]["sim"] == metrics["requests_completed"]["replay"] == 4
        assert abs(metrics["weights_plus_cache_bytes"]["rel_error"]) < 0.02
    md = (tmp_path / "comparison.md").read_text()
    assert "## resident" in md and "## emoe" in md
    assert (tmp_path / "profile.yaml").exists() and (tmp_path / "replay-emoe" / "trace.npz").exists()
    for kind in ("replay", "sim"):     # per-layer timelines of both runs, each layer once a step
        ev = json.loads((tmp_path / f"timeline-{kind}-emoe.json").read_text())["traceEvents"]
        attention = [e for e in ev if e.get("cat") == "attention"]
        assert attention and {e["args"]["layer"] for e in attention} == set(range(32))
