"""Faults: a sweep SIGKILLed again and again (the whole process group: the CLI and its
workers, mid-point or mid-write) keeps every finished point as it was, and the resumed
sweep gives the table an uninterrupted one gives. Every process the test starts is killed
and checked gone."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sim.sweep import load_sweep, run_sweep
from simhelpers import TINY_HW

POINTS = 8
KILLS = [2, 1, 1]          # worker processes of each killed run: the first has a pool to kill too
WAIT_S = 120               # bound on waiting for one run to make progress (never reached when healthy)

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg") or not Path("/proc").is_dir(),
                                reason="process groups and /proc (Linux)")


@pytest.fixture
def sweep(tmp_path, tiny_trace_path):
    scen = {"name": "base", "seed": 0, "model": "tiny", "hardware": TINY_HW,
            "workload": {"trace": str(tiny_trace_path), "requests": 12, "arrival": {"process": "poisson", "rate": 20}},
            "policy": {"name": "on_demand", "capacity": 0.5}, "limits": {"max_batch_tokens": 256}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(scen))
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {
        "policy.capacity": [0.25, 0.5, 0.75, 1.0], "policy.name": ["on_demand", "moe_infinity"]}}))
    return f


def finished(out: Path) -> dict:
    """Finished points -> their summary bytes."""
    return {p.parent.name: p.read_bytes() for p in out.glob("points/*/summary.json")
            if not p.parent.name.startswith(".")}


def half_written(out: Path) -> bool:
    return any(".tmp-" in p.name for p in (out / "points").glob("*")) if (out / "points").is_dir() else False


def live_in_group(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies awaiting their reaper do not)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # it exited while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while live_in_group(proc.pid) and time.monotonic() < deadline:   # the kernel delivers to each in turn
        time.sleep(0.05)
    assert not live_in_group(proc.pid), "a process of the killed sweep survived"


def test_sweep_killed_repeatedly_loses_nothing_and_resumes_to_the_uninterrupted_table(sweep, tmp_path):
    reference = run_sweep(load_sweep(sweep), output=tmp_path / "reference", progress=False)["table"]
    assert len(reference) == POINTS and (reference.status == "done").all()
    out = tmp_path / "killed"
    kept, killed_running = {}, 0
    for jobs in KILLS:
        before = finished(out)
        if len(before) == POINTS:
            break
        proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "sweep", str(sweep), "-o", str(out), "-j", str(jobs)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:   # kill on progress: a point finished, or one is being written
            deadline = time.monotonic() + WAIT_S
            while proc.poll() is None and time.monotonic() < deadline and \
                    len(finished(out)) == len(before) and not half_written(out):
                time.sleep(0.01)
            killed_running += proc.poll() is None
        finally:
            kill_group(proc)
        now = finished(out)
        assert all(now[h] == b for h, b in kept.items()), "a kill changed a finished point"
        kept = now
    assert killed_running == len(KILLS) and len(kept) < POINTS, "every run must be killed while it runs"

    res = run_sweep(load_sweep(sweep), output=out, progress=False)
    assert res["skipped"] == len(kept) and res["ran"] == POINTS - len(kept) and res["failed"] == 0
    assert all(finished(out)[h] == b for h, b in kept.items())
    assert not half_written(out), "the resumed sweep left a half-written point"
    pd.testing.assert_frame_equal(res["table"], reference)
