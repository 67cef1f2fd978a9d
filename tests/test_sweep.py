"""Sweeps: identical on local processes and Dask, resumable after a kill, failures isolated."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import yaml

from sim.sweep import expand, load_sweep, run_sweep
from simhelpers import TINY_HW


@pytest.fixture
def sweep_file(tmp_path, tiny_trace_path):
    scen = {"name": "base", "seed": 0, "model": "tiny", "hardware": TINY_HW,
            "workload": {"trace": str(tiny_trace_path), "requests": 12, "arrival": {"process": "poisson", "rate": 20}},
            "policy": {"name": "on_demand", "capacity": 0.5}, "limits": {"max_batch_tokens": 256}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(scen))

    def make(grid, **extra):
        spec = {"base": "base.yaml", "grid": grid, **extra}
        p = tmp_path / f"sweep{len(list(tmp_path.glob('sweep*.yaml')))}.yaml"
        p.write_text(yaml.safe_dump(spec))
        return p
    return make


def test_expand_grid_zip_seeds():
    spec = {"grid": {"a": [1, 2], "b": ["x"]}, "zip": {"c": [1, 2], "d": [3, 4]}, "seeds": [0, 1]}
    pts = expand(spec)
    assert len(pts) == 2 * 1 * 2 * 2
    assert pts[0] == {"a": 1, "b": "x", "c": 1, "d": 3, "seed": 0}
    assert {"a": 2, "b": "x", "c": 2, "d": 4, "seed": 1} in pts


def test_local_pool_and_dask_give_identical_tables(sweep_file, tmp_path):
    pytest.importorskip("dask.distributed")
    f = sweep_file({"policy.capacity": [0.25, 0.5, 0.75], "policy.name": ["on_demand", "moe_infinity"]})
    spec = load_sweep(f)
    a = run_sweep(spec, jobs=2, output=tmp_path / "local", progress=False)["table"]
    b = run_sweep(spec, jobs=2, dask="local", output=tmp_path / "dask", progress=False)["table"]
    assert len(a) == 6 and (a.status == "done").all()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, pd.read_parquet(tmp_path / "local" / "table.parquet"))


def test_local_slots_give_the_serial_table_failures_included(sweep_file, tmp_path):
    """-j 3 runs points in this process and in two forked workers; whichever ran a point,
    the table (run-time failures too) is the one a serial sweep writes."""
    f = sweep_file({"policy.capacity": [0.25, 0.5, 0.75], "hardware.memory_bytes": [3.0e6, 1.0e5]})
    spec = load_sweep(f)
    serial = run_sweep(spec, jobs=1, output=tmp_path / "serial", progress=False)["table"]
    pooled = run_sweep(spec, jobs=3, output=tmp_path / "pooled", progress=False)["table"]
    assert sorted(serial.status) == ["done"] * 3 + ["failed"] * 3
    pd.testing.assert_frame_equal(serial, pooled)


def test_bad_value_fails_alone_with_its_message(sweep_file, tmp_path):
    f = sweep_file({"policy.capacity": [0.5, 7.0, 0.75]})
    res = run_sweep(load_sweep(f), output=tmp_path / "o", progress=False)
    t = res["table"]
    assert t.status.tolist() == ["done", "failed", "done"]
    assert "capacity must be a fraction" in t.error[1]
    assert res["failed"] == 1
    # A point that fails at run time (impossible memory) records its error file too.
    f2 = sweep_file({"hardware.memory_bytes": [3.0e6, 1.0e5]})
    t2 = run_sweep(load_sweep(f2), output=tmp_path / "o2", progress=False)["table"]
    assert t2.status.tolist() == ["done", "failed"] and "impossible memory budget" in t2.error[1]
    assert len(list((tmp_path / "o2" / "points").glob("*.error.json"))) == 1


def test_killed_sweep_resumes_running_only_unfinished_points(sweep_file, tmp_path):
    f = sweep_file({"policy.capacity": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
                    "policy.name": ["on_demand", "moe_infinity"]})
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "sweep", str(f), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    def finished_points():
        return {p.parent.name for p in out.glob("points/*/summary.json") if not p.parent.name.startswith(".")}
    while time.time() < deadline and len(finished_points()) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = finished_points()
    assert 3 <= len(finished) < 14, "the sweep must be killed midway"
    stamps = {h: (out / "points" / h / "summary.json").stat().st_mtime_ns for h in finished}
    res = run_sweep(load_sweep(f), output=out, progress=False)
    assert res["skipped"] == len(finished) and res["ran"] == 14 - len(finished)
    assert (res["table"].status == "done").all()
    for h, ns in stamps.items():   # finished points were not touched
        assert (out / "points" / h / "summary.json").stat().st_mtime_ns == ns
    assert not [p for p in (out / "points").iterdir() if ".tmp-" in p.name]


def test_bad_sweep_files(tmp_path):
    from sim.sweep import SweepError
    p = tmp_path / "s.yaml"
    p.write_text("base: x.yaml\ngrid: {a: 3}\n")
    with pytest.raises(SweepError, match="grid.a must be a non-empty list"):
        load_sweep(p)
    p.write_text("grid: {a: [1]}\n")
    with pytest.raises(SweepError, match="'base'"):
        load_sweep(p)
    p.write_text("base: x.yaml\nzip: {a: [1, 2], b: [1]}\n")
    with pytest.raises(SweepError, match="same length"):
        load_sweep(p)


def test_section_then_key_overrides_and_no_leaks(sweep_file, tmp_path):
    """`policy: {...}` values combine with `policy.capacity` in any order, and one point's
    overrides never leak into another's."""
    f = sweep_file({"policy.capacity": [0.25, 0.75], "policy": [{"name": "on_demand"}, {"name": "random"}]})
    t = run_sweep(load_sweep(f), output=tmp_path / "o", progress=False)["table"]
    assert (t.status == "done").all()
    pairs = set(zip(t["policy.capacity"], t.policy))
    assert pairs == {(c, p) for c in (0.25, 0.75) for p in ('{"name": "on_demand"}', '{"name": "random"}')}
    small = t[t["policy.capacity"] == 0.25].peak_experts_bytes
    large = t[t["policy.capacity"] == 0.75].peak_experts_bytes
    assert small.max() < large.min()


def test_an_unreachable_dask_scheduler_is_the_users_mistake(sweep_file, tmp_path):
    """A wrong --dask address: one line naming it and how to start a scheduler, no traceback."""
    dask = pytest.importorskip("dask")
    pytest.importorskip("dask.distributed")
    from sim.sweep import SweepError
    f = sweep_file({"policy.capacity": [0.5]})
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(SweepError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:1 .*--dask local"):
            run_sweep(load_sweep(f), dask="tcp://127.0.0.1:1", output=tmp_path / "o", progress=False)


def test_a_regenerated_trace_is_never_answered_from_old_results(tmp_path):
    """Resume reuses a point only if its inputs are the same: a trace rewritten at the same
    path (another seed) gives new points that run, with results of the new trace."""
    from traces.format import save_trace
    from traces.synth import synthesize
    trace = tmp_path / "t.npz"
    save_trace(synthesize("tiny", ["qa", "code"], 12, seed=1), trace)
    scen = {"name": "base", "seed": 0, "model": "tiny", "hardware": TINY_HW,
            "workload": {"trace": str(trace), "arrival": {"process": "batch"}},
            "policy": {"name": "on_demand", "capacity": 0.5}, "limits": {"max_batch_tokens": 256}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(scen))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"policy.capacity": [0.5, 0.75]}}))
    first = run_sweep(load_sweep(tmp_path / "s.yaml"), output=tmp_path / "o", progress=False)
    again = run_sweep(load_sweep(tmp_path / "s.yaml"), output=tmp_path / "o", progress=False)
    assert again["skipped"] == 2 and again["ran"] == 0                  # same inputs: resumed
    save_trace(synthesize("tiny", ["qa", "code"], 12, seed=2), trace)    # same path, new routing
    changed = run_sweep(load_sweep(tmp_path / "s.yaml"), output=tmp_path / "o", progress=False)
    assert changed["ran"] == 2 and changed["skipped"] == 0
    assert set(changed["table"].hash).isdisjoint(first["table"].hash)
    assert changed["table"].misses.tolist() != first["table"].misses.tolist()


def _sweep_child(sweep_path, out, jobs, patch):
    """A `run_sweep` in a fresh process whose points run `patch` first (forked workers inherit it)."""
    code = textwrap.dedent(f"""
        import os, sys, time, sim.run
        from sim.sweep import load_sweep, run_sweep
        PARENT = os.getpid()
        real = sim.run.run_scenario
        def patched(s):
            {patch}
            return real(s)
        sim.run.run_scenario = patched
        run_sweep(load_sweep({str(sweep_path)!r}), jobs={jobs}, output={str(out)!r}, progress=False)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_a_point_that_exits_ends_a_pooled_sweep_as_a_serial_one(sweep_file, tmp_path):
    """SystemExit raised by a point (a plugin calling sys.exit) is raised by the sweep, as with
    -j 1; it used to leave a slot without a result and the sweep waiting forever."""
    f = sweep_file({"policy.capacity": [0.25, 0.5, 0.75]})
    for jobs in (1, 2, 3):
        proc = _sweep_child(f, tmp_path / f"o{jobs}", jobs,
                            'if s["policy"]["capacity"] == 0.5: raise SystemExit("a point called sys.exit")')
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"-j {jobs}: the sweep hung")
        assert proc.returncode == 1 and "a point called sys.exit" in out, (jobs, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers: Linux only")
def test_workers_end_with_a_killed_sweep(sweep_file, tmp_path):
    """Forked workers hold both ends of the pool's pipes: killed, the sweep must not leave them
    running (the kernel ends them with their parent)."""
    f = sweep_file({"policy.capacity": [0.25, 0.5, 0.75]})
    proc = _sweep_child(f, tmp_path / "o", 3, "time.sleep(60)")
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    assert len(workers) == 2, "the pool did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def alive(p):
        try:
            return open(f"/proc/{p}/stat").read().split()[2] != "Z"
        except OSError:
            return False
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "forked workers outlived their sweep"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers: Linux only")
def test_a_worker_killed_fails_its_point_and_the_sweep_runs_the_rest(sweep_file, tmp_path):
    """A worker that dies (killed for memory) fails the point it was running; the points left
    are run by the sweep's own process instead of all failing with the broken pool."""
    f = sweep_file({"policy.capacity": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875]})
    proc = _sweep_child(f, tmp_path / "o", 3, "if os.getpid() != PARENT: os._exit(9)")   # in a worker only
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    t = pd.read_csv(tmp_path / "o" / "table.csv")
    died = t[t.status == "failed"]
    assert 1 <= len(died) <= 2 and died.error.str.contains("worker process died").all()
    assert (t.status == "done").sum() == len(t) - len(died)
