"""`emoe sweep` (a grid of scenarios, resumable, one table) and `emoe choose` (its feasible Pareto set)."""
from __future__ import annotations

import time

from sim.cli.common import Registry, add_force, output_dir, output_file, positive, positive_whole, share
from traces.errors import UserError


def add_parsers(sub):
    add_sweep(sub)
    add_choose(sub)


def add_sweep(sub):
    s = sub.add_parser("sweep", help="run a grid of scenarios in parallel (resumable), one table out")
    s.add_argument("sweep", help="sweep YAML (base scenario + grid)")
    s.add_argument("-j", "--jobs", type=positive_whole, default=1,
                   help="points run at once here (this process and N-1 workers forked from it)")
    s.add_argument("--dask", metavar="ADDRESS", help="run on a Dask cluster: tcp://host:port, or 'local'")
    s.add_argument("-o", "--output", help="sweep directory (default: the file's `output`, or runs/sweep-NAME)")
    s.set_defaults(func=sweep)


def sweep(a):
    from sim.sweep import load_sweep, run_sweep
    spec = load_sweep(a.sweep)
    t0 = time.time()
    res = run_sweep(spec, jobs=a.jobs, dask=a.dask, output=a.output)
    df = res["table"]
    print(f"sweep {spec['name']}: {len(df)} points, ran {res['ran']}, reused {res['skipped']}, "
          f"failed {res['failed']} in {time.time() - t0:.1f}s; table in {res['output'] / 'table.csv'}")
    for _, row in df[df.status == "failed"].iterrows():
        print(f"  point {row.point} failed: {row.error}")
    if res["failed"]:
        raise SystemExit(1)


def add_choose(sub):
    s = sub.add_parser("choose", help="the SLO- and quality-feasible Pareto set of a sweep; write the chosen scenario")
    s.add_argument("sweep_dir", help="a sweep directory (table.csv, points/)")
    s.add_argument("--slo-attainment", type=share, default=0.0, metavar="SHARE",
                   help="least SLO attainment, e.g. 0.95")
    s.add_argument("--min-quality", type=share, default=0.0, metavar="SHARE",
                   help="least estimated quality, e.g. 0.95")
    s.add_argument("--max-memory-gb", type=positive, help="most peak memory, all the scenario's GPUs together "
                   "(1e9 bytes)")
    s.add_argument("--at", action="append", default=[], metavar="KEY=VALUE",
                   help="the setting of a swept axis other than the policy's (e.g. workload.arrival.rate=5): "
                   "policies are compared under one setting of everything else (repeat per axis)")
    g = s.add_mutually_exclusive_group()
    # OBJECTIVES: name -> (column, sign); sign 1 is smaller-is-better
    g.add_argument("--minimise", choices=Registry("sim.choose", "OBJECTIVES", where=lambda o: o[1] > 0),
                   metavar="OBJECTIVE", help="%(choices)s (default: memory)")
    g.add_argument("--maximise", choices=Registry("sim.choose", "OBJECTIVES", where=lambda o: o[1] < 0),
                   metavar="OBJECTIVE", help="%(choices)s")
    s.add_argument("-o", "--output", metavar="CHOSEN.yaml", help="write the chosen point's resolved scenario")
    s.add_argument("--plot", metavar="DIR", help="write the Pareto plot with the feasible set marked")
    add_force(s)
    s.set_defaults(func=choose)


def choose(a):
    import pandas as pd

    from sim import choose as ch
    from sim import plots
    objective = a.maximise or a.minimise or "memory"
    if a.output:
        output_file(a.output, "-o", a.force)
    if a.plot:
        output_dir(a.plot, "--plot", a.force)
    at = {}
    for item in a.at:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise UserError(f"--at {item}: give KEY=VALUE, e.g. --at workload.arrival.rate=5")
        if key.strip() in at:
            raise UserError(f"--at {key.strip()} given twice; give one setting per axis")
        at[key.strip()] = value.strip()
    c = ch.choose(a.sweep_dir, a.slo_attainment, a.min_quality, a.max_memory_gb, objective, at)
    n_feasible = int(c.pooled.feasible.sum())
    for note in c.notes:
        print(f"note: {note}")
    dims = "memory, latency, quality" + (f", {objective}" if objective in ("p99", "throughput") else "")
    where = "".join(f" at {k}={v}" for k, v in at.items())
    print(f"{len(c.pooled)} configurations{where}, {n_feasible} meet SLO attainment >= {a.slo_attainment:.0%} and "
          f"estimated quality >= {a.min_quality:.0%}; Pareto set ({dims}), best by {objective}:")
    if c.chosen is None:
        best = c.pooled.sort_values("slo_attainment", ascending=False).iloc[0]
        left = int(c.pooled.incomplete.sum())
        why = (f"; {left} of {len(c.pooled)} left out for serving fewer requests than a rival (see the notes: "
               "a limit that stops every run ranks them by requests finished)") if left else ""
        raise UserError(f"no configuration of {a.sweep_dir} meets the constraints (best SLO attainment "
                        f"{best.slo_attainment:.1%} by {best.label}{why}); relax --slo-attainment/--min-quality or "
                        "sweep more capacity")
    print(ch.format_table(c.pareto))
    q = c.pooled.get("estimated_quality")
    table = ch.load_table(a.sweep_dir)
    if "estimated_quality_source" in table and table.estimated_quality_source.notna().any():
        print(f"(quality: {table.estimated_quality_source.dropna().iloc[0]})")
    elif q is None or q.isna().all():
        print("(no quality calibration: quality not constrained)")
    print(f"chosen: {c.chosen['label']} capacity {c.chosen['policy_capacity']:g}, point {c.chosen['hash']}")
    eq = c.chosen.get("estimated_quality")
    has_estimates = q is not None and q.notna().any()
    if has_estimates and (eq is None or eq != eq):
        print("note: the chosen point has no quality estimate (no request finished?): its quality is unknown")
    elif a.min_quality <= 0 and eq is not None and eq < 0.9:
        print(f"note: quality was not constrained (--min-quality 0) and the chosen point's estimated quality is "
              f"{eq:.2f}; add e.g. --min-quality 0.9")
    if a.output:
        path = ch.write_chosen(a.sweep_dir, c.chosen, a.output, c.constraints)
        print(f"wrote {path}  (replay it: emoe replay {path} --device cuda)")
    if a.plot:
        # One point per configuration (seeds pooled, with their 95% intervals), as chosen from.
        pooled = c.pooled.assign(estimated_quality_source=table.get("estimated_quality_source", pd.Series()).iloc[0]
                                 if "estimated_quality_source" in table else None)
        # (choose's own feasible set and Pareto set, drawn as chosen: memory cap and left-out points included)
        written = plots.save(plots.pareto(pooled, a.slo_attainment, a.min_quality, chosen=c.chosen["hash"]),
                             a.plot, "pareto")
        print(f"wrote {written[0]}")
