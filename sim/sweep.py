"""Parameter sweeps: a base scenario, a grid of overrides, run in parallel, resumable.

Sweep file (YAML):

    base: quickstart.yaml            # scenario path, relative to the sweep file
    set: {workload.requests: 50}     # fixed overrides for every point (optional)
    grid:                            # cartesian product of dotted keys -> values
      policy.capacity: [0.2, 0.4, 0.6, 0.8]
    zip:                             # axes varied together (equal lengths), one more grid axis
      policy.name: [random, emoe]
      policy.miss: [reroute, reroute]
    seeds: [0, 1, 2]                 # repeat every point with these seeds (optional)
    output: runs/my-sweep            # default: runs/sweep-<file name>

Each point's fully resolved scenario, with the content of the files it reads, is hashed; its results live in
OUTPUT/points/<hash>/ (written atomically). A point whose results exist is not
run again, so an interrupted or crashed sweep resumes where it stopped and loses
nothing. A failing point records its error in OUTPUT/points/<hash>.error.json
and does not stop the others. OUTPUT/table.{parquet,csv} holds one row per point:
the swept values, status, error, and every summary metric.

Points run N at a time on this machine (-j N: this process and N - 1 forked workers),
or on a Dask cluster (`dask='tcp://host:port'`, or 'local' for a LocalCluster): Dask's
distributed scheduler takes over when a sweep outgrows one machine.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import pandas as pd
import yaml

from sim.scenario import ScenarioError, load_scenario, public
from traces.errors import UserError
from traces import yamlio

SWEEP_KEYS = {"base", "set", "grid", "zip", "seeds", "output", "name"}


class SweepError(UserError):
    """A sweep file that cannot run; the message names the file, the key and the fix."""


def load_sweep(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise SweepError(f"sweep file '{p}' does not exist")
    try:
        spec = yamlio.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{p}: malformed YAML: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{p}: a sweep is a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{p}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    if "base" not in spec:
        raise SweepError(f"{p}: 'base' (the scenario file to sweep) is required")
    for key in ("grid", "zip", "set"):
        if not isinstance(spec.get(key) or {}, dict):
            raise SweepError(f"{p}: '{key}' maps dotted scenario keys to {'values' if key == 'set' else 'lists'}")
    for key in ("grid", "zip"):
        for k, v in (spec.get(key) or {}).items():
            if not isinstance(v, list) or not v:
                raise SweepError(f"{p}: {key}.{k} must be a non-empty list of values")
    zipped = spec.get("zip") or {}
    if len({len(v) for v in zipped.values()}) > 1:
        raise SweepError(f"{p}: every zip axis needs the same length, got "
                         f"{ {k: len(v) for k, v in zipped.items()} }")
    seeds = spec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
        raise SweepError(f"{p}: seeds must be a list of integers")
    if not (isinstance(spec["base"], str) and (p.resolve().parent / spec["base"]).is_file()):
        raise SweepError(f"{p}: base '{spec['base']}' not found (looked at "
                         f"{p.resolve().parent / str(spec['base'])}); it is relative to the sweep file")
    spec["_dir"] = p.resolve().parent
    spec.setdefault("name", p.stem)
    return spec


def expand(spec: dict) -> list[dict]:
    """Every point's overrides, in a stable order: grid (row-major), zip, seeds."""
    grid = spec.get("grid") or {}
    zipped = spec.get("zip") or {}
    axes = [[(k, v) for v in vals] for k, vals in grid.items()]
    if zipped:
        keys = list(zipped)
        axes.append([tuple((k, zipped[k][i]) for k in keys) for i in range(len(zipped[keys[0]]))])
    points = []
    for combo in itertools.product(*axes) if axes else [()]:
        ov = {}
        for item in combo:
            pairs = item if isinstance(item[0], tuple) else (item,)
            for k, v in pairs:
                ov[k] = v
        for seed in spec.get("seeds") or [None]:
            point = dict(ov)
            if seed is not None:
                point["seed"] = seed
            points.append(point)
    return points


def point_hash(sc: dict) -> str:
    """Stable across runs and machines: the resolved scenario with paths made absolute, and
    the content of every file it reads (a trace regenerated at the same path is a new point,
    not one whose old results a resumed sweep may reuse)."""
    blob = json.dumps(dict(scenario=public(sc), inputs=input_digests(sc)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def input_digests(sc: dict) -> dict:
    """{scenario key: sha256 of the file's bytes} for each input file the scenario names."""
    from sim.scenario import POLICY_FILES
    base = Path(sc.get("_base_dir", "."))
    named = {"workload.trace": sc["workload"].get("trace"),
             "hardware.profile": sc["hardware"].get("profile") if isinstance(sc["hardware"], dict) else None,
             "quality.calibration": (sc.get("quality") or {}).get("calibration"),
             "quality.sensitivity": (sc.get("quality") or {}).get("sensitivity")}
    named.update({f"policy.{k}": sc["policy"].get(k) for k in POLICY_FILES})
    out = {}
    for key, path in named.items():
        if isinstance(path, str):
            p = Path(path).expanduser()
            p = p if p.is_absolute() else base / p
            if p.is_file():
                out[key] = _file_digest(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
    if "quality.calibration" not in out:
        # The package's default calibration estimates this point's quality: a recalibrated default is a
        # new point (its old estimates must not be ranked against new ones in a resumed sweep).
        from sim.quality import DEFAULT
        if DEFAULT.is_file():
            out["quality.calibration (package default)"] = _file_digest(str(DEFAULT), DEFAULT.stat().st_size,
                                                                        DEFAULT.stat().st_mtime_ns)
    for key, p in plugin_sources(sc).items():
        out[f"source of {key}"] = _file_digest(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
    return out


def plugin_sources(sc: dict) -> dict:
    """{scenario key: the file of the user's own component it names} (sim/plugins.py)."""
    from sim.plugins import source_file
    from sim.policies import POLICIES
    from sim.predictors import PREDICTORS
    from sim.schedulers import SCHEDULERS
    base = sc.get("_base_dir", ".")
    named = {"policy.name": (sc["policy"].get("name"), POLICIES, "policy"),
             "scheduler.name": ((sc.get("scheduler") or {}).get("name"), SCHEDULERS, "scheduler"),
             "policy.predictor": (sc["policy"].get("predictor"), PREDICTORS, "predictor")}
    found = {key: source_file(name, registry, kind, base) for key, (name, registry, kind) in named.items()}
    return {k: p for k, p in found.items() if p is not None}


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, read once per sweep (every point names the same trace)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_points(spec: dict) -> list[dict]:
    base = spec["_dir"] / spec["base"]
    fixed = list((spec.get("set") or {}).items())
    out = []
    for i, ov in enumerate(expand(spec)):
        try:
            # Whole sections before their keys: `policy: {...}` then `policy.capacity: x`.
            items = sorted(fixed + list(ov.items()), key=lambda kv: kv[0].count("."))
            sc = load_scenario(base, items)
            if sc["workload"]["trace"] is not None and not Path(sc["workload"]["trace"]).is_absolute():
                sc["workload"]["trace"] = str((Path(sc["_base_dir"]) / sc["workload"]["trace"]).resolve())
            out.append(dict(index=i, overrides=ov, scenario=sc, hash=point_hash(sc), error=None))
        except (ScenarioError, KeyError, ValueError) as e:
            # A bad value fails its own point only; the message is kept in the table.
            h = hashlib.sha256(json.dumps(ov, sort_keys=True, default=str).encode()).hexdigest()[:16]
            out.append(dict(index=i, overrides=ov, scenario=None, hash=h, error=str(e)))
    return out


def _atomic_write(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_point(scenario: dict, out_dir: str) -> dict:
    """Run one point and write its results directory (a worker function: local or Dask)."""
    from sim.run import run_scenario
    out = Path(out_dir)
    err_file = out.with_name(out.name + ".error.json")
    try:
        res = run_scenario(scenario)
        res.write(out)
        if err_file.exists():
            err_file.unlink()
        return dict(status="done", summary=res.summary)
    except Exception as e:  # noqa: BLE001 - any failure is this point's, recorded and reported
        msg = f"{type(e).__name__}: {e}"
        _atomic_write(err_file, json.dumps(dict(error=msg, traceback=traceback.format_exc()), indent=2))
        return dict(status="failed", error=msg)


def _flat(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def run_sweep(spec: dict, jobs: int = 1, dask: str | None = None, output=None, progress: bool = True) -> dict:
    """Run every unfinished point; returns {table, ran, skipped, failed, output}."""
    out = Path(output or spec.get("output") or Path("runs") / f"sweep-{spec['name']}")
    if not out.is_absolute() and output is None and spec.get("output"):
        out = spec["_dir"] / out
    try:
        (out / "points").mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SweepError(f"sweep output '{out}': a file is in the way; choose another -o") from None
    for stale in (out / "points").glob(".*.tmp-*"):   # half-written points of a killed run
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    points = resolve_points(spec)
    results: dict[int, dict] = {}
    todo = []
    for pt in points:
        pdir = out / "points" / pt["hash"]
        if pt["error"]:
            results[pt["index"]] = dict(status="failed", error=pt["error"])
        elif (pdir / "summary.json").exists():
            results[pt["index"]] = dict(status="done", summary=json.loads((pdir / "summary.json").read_text()),
                                        skipped=True)
        else:
            todo.append(pt)
    skipped = sum(1 for r in results.values() if r.get("skipped"))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(points), initial=len(results), desc=f"sweep {spec['name']}", unit="pt", disable=None)

    def record(pt, res):
        results[pt["index"]] = res
        if bar is not None:
            n_fail = sum(1 for r in results.values() if r["status"] == "failed")
            bar.set_postfix(done=len(results) - n_fail, failed=n_fail)
            bar.update(1)

    try:
        if todo:
            _execute(todo, out, jobs, dask, record)
    finally:
        if bar is not None:
            bar.close()
        table = _table(points, results, out)
    return dict(table=table, ran=len(todo), skipped=skipped,
                failed=sum(1 for r in results.values() if r["status"] == "failed"), output=out)


def _execute(todo, out: Path, jobs: int, dask: str | None, record):
    args = [(pt, pt["scenario"], str(out / "points" / pt["hash"])) for pt in todo]
    if dask:
        from dask.distributed import Client, LocalCluster, as_completed
        cluster = LocalCluster(n_workers=max(jobs, 1), threads_per_worker=1, processes=True,
                               dashboard_address=None) if dask == "local" else None
        try:
            client = Client(cluster if cluster is not None else dask)
        except OSError as e:          # the user's address: nothing listens there
            if cluster is not None:
                raise
            raise SweepError(f"cannot reach the Dask scheduler at {dask} ({e}); start one there "
                             "(`dask scheduler`, then `dask worker ADDRESS`), or use --dask local") from None
        try:
            futures = {client.submit(run_point, sc, d, pure=False): pt for pt, sc, d in args}
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 - a worker lost: the point failed
                    res = dict(status="failed", error=f"{type(e).__name__}: {e}")
                record(futures[fut], res)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    elif min(jobs, len(args)) <= 1:
        for pt, sc, d in args:
            record(pt, run_point(sc, d))
    else:
        _run_local_pool(args, min(jobs, len(args)), record)


def _run_local_pool(args, jobs: int, record):
    """`-j N`: N points at a time, one in this process and N - 1 in workers forked from it.

    Forked once this process has imported what a point runs, the workers share its
    interpreter and libraries (copy-on-write) rather than each importing its own, and the
    parent, which would otherwise sit idle holding its own ~70 MB of them, runs points too:
    a -j 2 sweep's memory is two points', not three interpreters' (README, "A day of
    traffic"). Off Linux, N spawned workers run them all. Results are recorded in this
    thread only, as they come, whichever slot ran them; what a point raises beyond an
    Exception (SystemExit, KeyboardInterrupt) is raised here, as `-j 1` raises it. A worker
    that dies (killed for memory) fails the point it ran; the points left are run by this
    process, or, with no slot here, fail as not run (a rerun resumes them)."""
    import queue
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    ctx = _worker_context()
    local = ctx.get_start_method() == "fork"
    work = queue.SimpleQueue()
    for item in args:
        work.put(item)
    done = queue.SimpleQueue()

    class NotRun(Exception):
        """The pool was already broken: the point was not sent to a worker."""

    def remote(sc, d):
        try:
            fut = ex.submit(run_point, sc, d)
        except BrokenProcessPool:
            raise NotRun from None
        return fut.result()

    def slot(run):
        while True:
            try:
                pt, sc, d = work.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((pt, run(sc, d), None))
            except NotRun:                   # back to the queue, for a slot in this process
                work.put((pt, sc, d))
                return
            except BrokenProcessPool as e:   # a worker died: every remote slot is done
                done.put((pt, dict(status="failed", error=f"worker process died running this point ({e})"), None))
                return
            except Exception as e:  # noqa: BLE001 - a point's own failure
                done.put((pt, dict(status="failed", error=f"{type(e).__name__}: {e}"), None))
            except BaseException as e:  # noqa: BLE001 - raised in the main thread, never a silent hang
                done.put((pt, None, e))
                return

    with ProcessPoolExecutor(max_workers=jobs - local, mp_context=ctx, initializer=_die_with_parent if local else None,
                             initargs=(os.getpid(),) if local else ()) as ex:
        ex.submit(int).result()    # forks every worker now, before this function starts its threads
        slots = [threading.Thread(target=slot, args=(remote,), daemon=True) for _ in range(jobs - local)]
        if local:
            slots.append(threading.Thread(target=slot, args=(run_point,), daemon=True))
        for t in slots:
            t.start()
        try:
            left = len(args)
            while left:
                try:
                    pt, res, raised = done.get(timeout=0.5)
                except queue.Empty:
                    if any(t.is_alive() for t in slots) or not done.empty():
                        continue
                    while not work.empty():   # every slot stopped (the pool broke, none here)
                        pt, _, _ = work.get_nowait()
                        record(pt, dict(status="failed", error="not run: the sweep's worker processes died"))
                    break
                if raised is not None:
                    raise raised
                record(pt, res)
                left -= 1
        finally:                   # interrupted: no slot takes another point
            while not work.empty():
                work.get_nowait()
            if local:
                gc.unfreeze()
        for t in slots:
            t.join()


def _die_with_parent(parent_pid: int) -> None:
    """A forked worker inherits both ends of the pool's pipes, so it would not notice its
    parent killed (SIGTERM, SIGKILL) and would wait forever: the kernel ends it instead."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:     # the parent died before that took hold
        os._exit(1)


def _worker_context():
    """Fork on Linux, once this process holds what every point imports (its pages are then
    shared with the workers); spawn elsewhere."""
    import multiprocessing as mp
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    import sim.run  # noqa: F401 - what every point imports
    from sim.results import code_version
    code_version()        # asked of git here, once, not by each worker (a fork of a worker)
    gc.collect()
    gc.freeze()           # the collector then leaves the shared objects' pages alone
    return mp.get_context("fork")


def describe(sc: dict | None) -> dict:
    """Columns every table gets from the resolved scenario, whatever was swept: for plots."""
    if sc is None:
        return {}
    pol = sc["policy"]
    label = pol["name"]
    if pol["name"] == "emoe":
        label = "eMoE-E" if pol.get("interval") == 1 else f"eMoE p={pol.get('interval', 40)}"
        label += "" if pol.get("skip", True) else " no-skip"
        label += "" if pol.get("task_aware", True) else " no-task-aware"
    sched = sc["scheduler"]["name"]
    return dict(policy_name=pol["name"], policy_capacity=pol.get("capacity", 1.0 if pol["name"] == "resident"
                                                                  else None),
                scheduler_name=sched, label=f"{label} + {sched}" if sched != "fcfs" else label,
                arrival_rate=sc["workload"]["arrival"].get("rate"), seed_used=sc["seed"])


def _table(points, results, out: Path) -> pd.DataFrame:
    rows = []
    for pt in points:
        res = results.get(pt["index"], dict(status="pending"))
        row = {"point": pt["index"], "hash": pt["hash"]}
        row.update({k: _flat(v) for k, v in pt["overrides"].items()})
        row.update(describe(pt["scenario"]))
        row["status"] = res["status"]
        row["error"] = res.get("error", "")
        for k, v in (res.get("summary") or {}).items():
            row[k] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    for name, writer in (("table.csv", lambda p: df.to_csv(p, index=False)),
                         ("table.parquet", lambda p: df.to_parquet(p, index=False))):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.tmp-")
        os.close(fd)
        try:
            writer(tmp)
            os.replace(tmp, out / name)
        except (ImportError, ValueError, TypeError):   # parquet needs uniform column types
            if os.path.exists(tmp):
                os.unlink(tmp)
    return df
