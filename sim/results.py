"""Metrics of a run and the results directory both engines (sim, replay) write.

Directory layout:
    scenario.yaml   the fully resolved scenario
    meta.json       code version, seed, engine, wall time, command
    summary.json    the headline metrics (keys below)
    requests.csv    one row per request (also requests.parquet)
    timeline.csv    one row per engine step (also timeline.parquet)
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


from traces.errors import UserError
from traces import yamlio

SUMMARY_KEYS = ("requests_completed", "requests_rejected", "peak_memory_bytes", "ttft_mean_s", "ttft_p99_s",
                "tpot_mean_s", "e2e_mean_s", "e2e_p99_s", "throughput_tokens_per_s", "slo_attainment",
                "expert_hit_rate", "bytes_loaded", "routing_fidelity")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code that runs in this process: asked of git once (a sweep's worker runs many points)."""
    import importlib.metadata
    try:
        v = importlib.metadata.version("emoe")
    except importlib.metadata.PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{v}+{sha}{'-dirty' if dirty else ''}" if sha else v


def slo_met(r) -> bool:
    ttft = r.first_token_s - r.arrival_s
    e2e = r.finish_s - r.arrival_s
    tpot = (r.finish_s - r.first_token_s) / (r.generated - 1) if r.generated > 1 else 0.0
    s = r.slo
    return (ttft <= s.get("ttft_s", np.inf)) and (e2e <= s.get("e2e_s", np.inf)) and (tpot <= s.get("tpot_s", np.inf))


REQUEST_COLUMNS = ("request_id", "task", "prompt_tokens", "output_tokens", "generated_tokens", "arrival_s",
                   "admitted_s", "first_token_s", "finish_s", "ttft_s", "tpot_s", "e2e_s", "slo_met", "completed",
                   "rejected", "preemptions", "hits", "misses", "reroutes", "gate_mass_kept")


def request_table(requests) -> pd.DataFrame:
    """One row per request, in workload order. Built column by column, numbers straight into
    arrays: a row dict per request costs about 1 KB, which a day of traffic cannot afford."""
    requests = list(requests)
    n = len(requests)
    nan = np.nan

    def col(f, dtype):
        return np.fromiter((f(r) for r in requests), dtype=dtype, count=n)

    def opt(name):
        return col(lambda r: nan if getattr(r, name) is None else getattr(r, name), np.float64)

    done = col(lambda r: r.finish_s is not None, bool)
    finish, first, arrival = opt("finish_s"), opt("first_token_s"), col(lambda r: r.arrival_s, np.float64)
    generated = col(lambda r: r.generated, np.int64)
    routes = col(lambda r: r.routes, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(done & (generated > 1), (finish - first) / np.maximum(generated - 1, 1),
                        np.where(done, 0.0, nan))
        kept = np.where(routes > 0, col(lambda r: r.gate_kept, np.float64) / np.maximum(routes, 1), nan)
    cols = dict(request_id=[r.rid for r in requests], task=[r.task for r in requests],
                prompt_tokens=col(lambda r: r.prompt_tokens, np.int64),
                output_tokens=col(lambda r: r.output_tokens, np.int64),
                generated_tokens=np.where(done, generated, 0), arrival_s=arrival, admitted_s=opt("admitted_s"),
                first_token_s=first, finish_s=finish, ttft_s=first - arrival, tpot_s=tpot,
                e2e_s=np.where(done, finish - arrival, nan),
                slo_met=col(lambda r: r.finish_s is not None and slo_met(r), bool), completed=done,
                rejected=[r.rejected for r in requests], preemptions=col(lambda r: r.preemptions, np.int64),
                hits=col(lambda r: r.hits, np.int64), misses=col(lambda r: r.misses, np.int64),
                reroutes=col(lambda r: r.reroutes, np.int64), gate_mass_kept=kept)
    return pd.DataFrame({c: pd.Series(cols[c], dtype=_REQUEST_DTYPES.get(c)) for c in REQUEST_COLUMNS})


_REQUEST_DTYPES = {c: "float64" for c in ("arrival_s", "admitted_s", "first_token_s", "finish_s", "ttft_s", "tpot_s",
                                           "e2e_s", "gate_mass_kept")}
_REQUEST_DTYPES.update({c: "int64" for c in ("prompt_tokens", "output_tokens", "generated_tokens", "preemptions",
                                              "hits", "misses", "reroutes")})
_REQUEST_DTYPES.update({c: "bool" for c in ("slo_met", "completed")})


def summarize(req, policy_counters: dict, peak_total: float, peak_parts: dict,
              extra: dict | None = None, model: str | None = None, calibration: str | None = None) -> dict:
    """The headline metrics of a run, simulated or replayed alike, with the estimated output
    quality beside the latency (sim/quality.py; `model` names the model the run served, so the
    estimate says when it was calibrated on another one; `calibration` is the scenario's
    quality.calibration file, None for the package's default).

    req: the request table, a DataFrame or a TableLog (sim/resultlog.py); it is read a column
    at a time, so a million requests' table need not be in memory at once."""
    def col(name) -> np.ndarray:
        return req[name].to_numpy() if isinstance(req, pd.DataFrame) else req.column(name)

    def labels(name) -> pd.Categorical:   # a string column (task, rejected) as categories: no object per row
        return pd.Categorical(req[name]) if isinstance(req, pd.DataFrame) else req.categories(name)

    completed = col("completed").astype(bool)
    n_done = int(completed.sum())

    def done(name) -> pd.Series:
        return pd.Series(col(name)[completed])
    span = float(done("finish_s").max() - pd.Series(col("arrival_s")).min()) if n_done else np.nan

    def stat(name, *fs):
        values = done(name)
        return [float(f(values)) if n_done else float("nan") for f in fs]
    ttft_mean, ttft_p50, ttft_p99 = stat("ttft_s", np.mean, np.median, lambda x: np.percentile(x, 99))
    e2e_mean, e2e_p50, e2e_p99 = stat("e2e_s", np.mean, np.median, lambda x: np.percentile(x, 99))
    s = dict(requests_completed=n_done, requests_rejected=int((labels("rejected") != "").sum()),
             peak_memory_bytes=float(peak_total),
             ttft_mean_s=ttft_mean, ttft_p50_s=ttft_p50, ttft_p99_s=ttft_p99,
             tpot_mean_s=stat("tpot_s", np.mean)[0],
             e2e_mean_s=e2e_mean, e2e_p50_s=e2e_p50, e2e_p99_s=e2e_p99,
             throughput_tokens_per_s=float(done("generated_tokens").sum() / span) if n_done and span > 0 else 0.0,
             slo_attainment=float(pd.Series(col("slo_met")).mean()) if len(completed) else float("nan"),
             makespan_s=float(span))
    s.update(policy_counters)
    s.update({f"peak_{k}_bytes": float(v) for k, v in peak_parts.items()})
    if extra:
        s.update(extra)
    from sim import quality
    per_task = pd.DataFrame({"completed": completed, "task": labels("task"),
                             **{c: col(c) for c in ("gate_mass_kept", "output_tokens")}}, copy=False)
    s.update(quality.summarize(quality.load(calibration), per_task, model, calibration))
    return s


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


def write_results(out_dir, scenario_yaml: str, requests, timeline, summary: dict,
                  meta: dict, trace=None, files: dict | None = None) -> Path:
    """Write into a temporary sibling, then move into place: a crash leaves no half directory,
    and an existing directory is never overwritten. requests, timeline: DataFrames or TableLogs
    (sim/resultlog.py), written block by block."""
    from sim.resultlog import TableLog
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"results directory '{out}' exists and is not empty; choose another -o "
                              "(nothing was overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "scenario.yaml").write_text(scenario_yaml)
        if trace is not None:
            from traces.format import save_trace
            save_trace(trace, tmp / "trace.npz")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_jsonable))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
        try:
            import pyarrow.parquet  # noqa: F401
            parquet = True
        except ImportError:
            parquet = False   # CSV is complete on its own
        for name, table in (("requests", requests), ("timeline", timeline)):
            if isinstance(table, pd.DataFrame):
                table = TableLog.of(table)
            table.write(tmp / f"{name}.parquet" if parquet else None, tmp / f"{name}.csv")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_results(path) -> dict:
    p = Path(path)
    if not (p / "summary.json").exists():
        raise UserError(f"'{p}' is not a results directory (no summary.json); give a directory `emoe run` "
                        "or `emoe replay` wrote")
    name = "summary.json"
    try:
        summary = json.loads((p / name).read_text())
        name = "requests.csv"
        requests = pd.read_csv(p / name)
        name = "timeline.csv"
        timeline = pd.read_csv(p / name)
        name = "scenario.yaml"
        scenario = yamlio.safe_load((p / name).read_text())
    except FileNotFoundError:
        raise UserError(f"'{p}' lacks {name}; it is not a whole results directory (run it again)") from None
    except (ValueError, pd.errors.ParserError, yaml.YAMLError, UnicodeDecodeError) as e:   # JSON errors: ValueError
        raise UserError(f"{p / name}: damaged ({str(e).splitlines()[0]}); run it again") from None
    return dict(summary=summary, requests=requests, timeline=timeline, scenario=scenario)
