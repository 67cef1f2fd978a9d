"""`emoe plot`: the standard figures (sim/plots.py) from sweep tables and results directories;
`emoe timeline`: a run's timeline as Chrome trace JSON (sim/chrometrace.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from sim.cli.common import Registry, add_force, output_dir, output_file
from traces.errors import UserError, message


def add_parsers(sub):
    s = sub.add_parser("plot", help="standard figures from sweep tables or results directories")
    s.add_argument("inputs", nargs="+", help="sweep directories (table.csv) and/or results directories")
    s.add_argument("--kind", default="auto", choices=Registry("sim.plots", "KINDS", first=["auto", "timeline"]),
                   metavar="KIND", help="%(choices)s (default auto: every figure the table supports; "
                   "timeline: a window of each results directory's steps, see --window)")
    s.add_argument("--window", type=window_arg, default=None, metavar="START:END",
                   help="--kind timeline: the seconds to draw (default: the whole run)")
    s.add_argument("-o", "--output", default="plots", help="directory for PNG and SVG files")
    add_force(s)
    s.set_defaults(func=plot)

    s = sub.add_parser("timeline", help="a run's timeline as Chrome trace JSON (open in Perfetto or "
                       "chrome://tracing)")
    s.add_argument("results", nargs="+", help="results directories (emoe run, emoe replay)")
    s.add_argument("-o", "--output", default=None,
                   help="the JSON file (one results directory only; default RESULTS/timeline.trace.json)")
    s.add_argument("--window", type=window_arg, default=None, metavar="START:END", help="only these seconds")
    s.add_argument("--layers", action="store_true",
                   help="add each layer's compute and each copy on the host link (simulations: simulated "
                        "again up to the window's end, default the first 20 steps; CPU replays: as measured)")
    add_force(s)
    s.set_defaults(func=timeline)


def window_arg(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not START:END in seconds (e.g. 2.5:4)") from None
    if not b > a >= 0:
        raise argparse.ArgumentTypeError(f"'{text}': need 0 <= START < END")
    return a, b


def timeline(a):
    from sim.chrometrace import write_chrome_trace
    if a.output is not None and len(a.results) > 1:
        raise UserError("-o names one file: give one results directory, or drop -o to write each one's "
                        "timeline.trace.json")
    for d in a.results:
        out = output_file(a.output if a.output is not None else Path(d) / "timeline.trace.json", "-o", a.force)
        print(f"wrote {write_chrome_trace(d, out, a.window, layers=a.layers)}")


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
    if a.kind == "timeline" and (tables or not results):
        raise UserError("--kind timeline draws results directories (from emoe run or emoe replay), "
                        "not sweep tables")
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
    if a.kind == "timeline":
        for p in results:
            r = load_results(p)
            written += plots.save(plots.timeline(r, a.window, f"{p.name}: {r['scenario']['policy']['name']}"),
                                  out, f"timeline_{p.name}")
        results = []
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
