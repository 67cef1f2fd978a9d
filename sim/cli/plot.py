"""`emoe plot`: the standard figures (sim/plots.py) from sweep tables and results directories."""
from __future__ import annotations

from pathlib import Path

from sim.cli.common import Registry, add_force, output_dir
from traces.errors import UserError, message


def add_parsers(sub):
    s = sub.add_parser("plot", help="standard figures from sweep tables or results directories")
    s.add_argument("inputs", nargs="+", help="sweep directories (table.csv) and/or results directories")
    s.add_argument("--kind", default="auto", choices=Registry("sim.plots", "KINDS", first=["auto"]), metavar="KIND",
                   help="%(choices)s (default auto: every figure the table supports)")
    s.add_argument("-o", "--output", default="plots", help="directory for PNG and SVG files")
    add_force(s)
    s.set_defaults(func=plot)


def plot(a):
    from sim import plots
    from sim.results import load_results
    out = output_dir(a.output, "-o", a.force)
    written = []
    tables = [Path(p) for p in a.inputs if (Path(p) / "table.csv").exists() or
              (str(p).endswith(".csv") and Path(p).is_file())]
    results = [Path(p) for p in a.inputs if (Path(p) / "summary.json").exists()]
    unknown = [p for p in a.inputs if Path(p) not in tables and Path(p) not in results]
    if unknown:
        raise UserError(f"{unknown[0]}: neither a sweep directory (table.csv) nor a results directory "
                        "(summary.json)")
    import pandas as pd
    for p in tables:
        try:
            t = pd.read_csv(p if p.suffix == ".csv" else p / "table.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not a sweep table ({message(e)}); make one with `emoe sweep`") from None
        sub = out / (p.stem if p.suffix == ".csv" else p.name) if len(tables) > 1 else out
        if a.kind == "auto":
            written += plots.auto(t, sub)
        else:
            written += plots.save(plots.KINDS[a.kind](t), sub, a.kind)
    if results:
        runs = {}
        for p in results:
            r = load_results(p)
            runs[f"{p.name} ({r['scenario']['policy']['name']})"] = r["requests"]
        for metric in ("e2e_s", "ttft_s"):
            written += plots.save(plots.latency_cdf(runs, metric), out, f"cdf_{metric[:-2]}")
    if not written:
        raise UserError("nothing to plot: a sweep needs a varied policy.capacity, arrival rate or interval, "
                        "or pass results directories for latency CDFs")
    for p in written:
        print(f"wrote {p}")
