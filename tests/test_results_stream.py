"""Results streamed out (issue 16): a run's tables spilled to disk give exactly the results
held in memory, in workload order, and the engine holds no request after it leaves."""
import gc

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sim.engine import Engine
from sim.request import Request
from sim.resultlog import RequestLog, TableLog
from sim.results import load_results
from sim.run import run_scenario
from sim.timeline import TimelineLog
from simhelpers import tiny_scenario


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, spilled every few blocks: what a million requests do, on a small run."""
    monkeypatch.setattr(TableLog, "HOLD_ROWS", 40)
    monkeypatch.setattr(RequestLog, "BLOCK", 7)
    monkeypatch.setattr(TimelineLog, "BLOCK", 16)


CASES = {
    "whole run": {},
    # stopped at a limit: requests running, waiting and not yet arrived are tabled as they stand
    "stopped early": {"limits__max_sim_time_s": 1.0},
    "batch, preempting": {"workload__arrival": {"process": "batch"}, "hardware__memory_bytes": 2.2e6},
    # shortest first: requests leave far out of workload order, and some are refused
    "sjf, rejecting": {"workload__arrival": {"process": "batch"}, "scheduler": {"name": "sjf"},
                       "hardware__memory_bytes": 1.68e6},
}


@pytest.mark.parametrize("case", CASES)
def test_spilled_tables_give_the_held_results(tiny_trace_path, tmp_path, monkeypatch, case):
    sc = tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5}, **CASES[case])
    held = run_scenario(sc)
    assert not held.request_log.spilled
    with monkeypatch.context() as m:
        m.setattr(TableLog, "HOLD_ROWS", 40)
        m.setattr(RequestLog, "BLOCK", 7)
        m.setattr(TimelineLog, "BLOCK", 16)
        spilled = run_scenario(sc)
    assert spilled.request_log.spilled and spilled.timeline_log.spilled
    assert spilled.summary == held.summary
    pd.testing.assert_frame_equal(spilled.requests, held.requests, check_exact=True)
    pd.testing.assert_frame_equal(spilled.timeline, held.timeline, check_exact=True)
    a, b = held.write(tmp_path / "held"), spilled.write(tmp_path / "spilled")
    for name in ("requests.csv", "timeline.csv", "summary.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("requests", "timeline"):
        pd.testing.assert_frame_equal(pq.read_table(b / f"{name}.parquet").to_pandas(),
                                      getattr(held, name), check_exact=True)
    assert pq.ParquetFile(b / "requests.parquet").num_row_groups > 1   # written block by block
    back = load_results(b)
    assert back["summary"]["requests_completed"] == held.summary["requests_completed"]


def test_request_table_is_in_workload_order_with_every_request(tiny_trace_path, small_blocks):
    """Requests leave out of order (short ones first); the table keeps the workload's order,
    and a run stopped early still lists the requests it never finished."""
    from traces.format import load_trace
    ids = list(load_trace(tiny_trace_path).request_id)
    sc = tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5}, limits__max_sim_time_s=1.0)
    res = run_scenario(sc)
    assert list(res.requests.request_id) == ids
    done = res.requests.completed
    assert 0 < done.sum() < len(ids)   # the limit cut the run: some never finished
    assert res.summary["requests_completed"] == done.sum()
    finish = res.requests.finish_s[done].to_numpy()
    assert (finish[1:] < finish[:-1]).any(), "requests left in workload order: the reordering is untested"


def test_engine_holds_no_request_after_it_leaves(tiny_trace_path, small_blocks, monkeypatch):
    """Requests are built as they arrive and dropped once tabled: at light load the live
    Request objects stay a handful however many have been served."""
    sc = tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5},
                       workload__arrival={"process": "poisson", "rate": 2.0})
    live = []
    real = Engine._finish

    def requests_alive() -> int:
        return sum(type(o) is Request for o in gc.get_objects())   # (isinstance wakes lazy modules)
    before = requests_alive()   # other tests' (none of this run's)

    def counting(self, done, now):
        real(self, done, now)
        if self.n_finished % 4 == 0:   # (Requests hold no cycles: refcounting frees them at once)
            live.append(requests_alive() - before)
    monkeypatch.setattr(Engine, "_finish", counting)
    res = run_scenario(sc)
    n = len(res.requests)
    assert n >= 40 and len(live) >= 10
    # at most a block waiting to be tabled, those running or queued, and the next to arrive
    assert max(live) <= RequestLog.BLOCK + 16 + 2, max(live)


def test_a_spool_that_cannot_be_written_is_one_line_naming_tmpdir(tiny_trace_path, small_blocks, tmp_path,
                                                                  monkeypatch, capsys):
    import tempfile

    from sim.cli import main
    from sim.scenario import dump
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no" / "such" / "dir"))
    sc = tmp_path / "s.yaml"
    sc.write_text(dump(tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5})))
    assert main(["run", str(sc), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results spool" in err[0] and "TMPDIR" in err[0]
    assert not (tmp_path / "out").exists()


def test_engine_takes_requests_in_any_order(tiny_trace_path):
    """A sequence of Requests (not only a list) is served in arrival order, as Arrivals is."""
    from sim.run import build, outcome
    from sim.workload import Arrivals, build_requests
    sc = tiny_scenario(tiny_trace_path, {"name": "on_demand", "capacity": 0.5})
    summaries = []
    for make in (lambda p: Arrivals(sc, p.trace), lambda p: tuple(reversed(build_requests(sc, p.trace)))):
        parts = build(sc)
        eng = Engine(*parts[:2], parts.trace, make(parts), parts.policy, parts.scheduler, sc["limits"]).run()
        summaries.append(outcome(eng, sc)[0])
    assert summaries[0] == summaries[1]
