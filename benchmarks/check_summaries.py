"""Refactoring guard: every shipped scenario gives the same summary before and after a change.

    python benchmarks/check_summaries.py record BEFORE.json      # on the old code
    python benchmarks/check_summaries.py compare BEFORE.json     # on the new code: exit 1 on a change

Runs each scenario file in scenarios/ (not the sweeps; add `--sweep FILE` to include a
sweep's points, e.g. scenarios/paper/memory-fidelity.yaml, or `--paper` for every sweep the
reproduction table is compiled from) in the simulator and keeps
every numeric summary value. `compare` reports each key that moved by more than
`--rtol` (default 1e-9: a refactor must not move results; wall-clock keys are skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"wall_time_s", "engine_steps_per_s"}


def _numeric(summary: dict) -> dict:
    out = {}
    for k, v in summary.items():
        if k in VOLATILE:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, (str, dict)):
                out[k] = v
            continue
        out[k] = float(v)
    return out


def collect(sweeps: list[str]) -> dict:
    from sim.run import run_scenario
    from sim.scenario import ScenarioError, load_scenario
    from sim.sweep import load_sweep, resolve_points
    results = {}
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        try:
            sc = load_scenario(path)
        except ScenarioError as e:
            # e.g. emoe-small-moe-captured.yaml reads a trace `emoe capture` writes under runs/:
            # said, and kept as the result, so both sides of a comparison must agree on it.
            results[path.name] = {"skipped": str(e)}
            print(f"{path.name}: skipped ({e})", flush=True)
            continue
        results[path.name] = _numeric(run_scenario(sc).summary)
        print(f"{path.name}: {results[path.name].get('e2e_mean_s', float('nan')):.4f} s mean e2e", flush=True)
    for sweep in sweeps:
        for pt in resolve_points(load_sweep(sweep)):
            key = f"{Path(sweep).name}#{json.dumps(pt['overrides'], sort_keys=True)}"
            results[key] = _numeric(run_scenario(pt["scenario"]).summary) if pt["scenario"] else {"error": pt["error"]}
            print(key, flush=True)
    return results


def paper_sweeps() -> list[str]:
    """The sweeps reproduce.sh runs, read from it so the two never disagree."""
    import re
    script = (ROOT / "scenarios" / "paper" / "reproduce.sh").read_text()
    names = re.search(r"^for f in (.+); do$", script, re.M).group(1).split()
    return [str(ROOT / "scenarios" / "paper" / f"{n}.yaml") for n in names]


def differences(before: dict, after: dict, rtol: float) -> list[str]:
    out = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            out.append(f"{name}: only {'before' if b is None else 'after'}")
            continue
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            if isinstance(x, float) and isinstance(y, float):
                if not (math.isclose(x, y, rel_tol=rtol, abs_tol=1e-12) or (math.isnan(x) and math.isnan(y))):
                    out.append(f"{name}: {k} {x!r} -> {y!r}")
            elif x != y:
                out.append(f"{name}: {k} {x!r} -> {y!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "compare"])
    ap.add_argument("file")
    ap.add_argument("--sweep", action="append", default=[], help="also every point of this sweep file")
    ap.add_argument("--paper", action="store_true",
                    help="also every sweep of the paper-reproduction table (scenarios/paper/reproduce.sh)")
    ap.add_argument("--rtol", type=float, default=1e-9)
    a = ap.parse_args(argv)
    now = collect(a.sweep + (paper_sweeps() if a.paper else []))
    if a.mode == "record":
        Path(a.file).write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"recorded {len(now)} summaries in {a.file}")
        return 0
    diffs = differences(json.loads(Path(a.file).read_text()), now, a.rtol)
    print("\n".join(diffs) if diffs else f"all {len(now)} summaries unchanged")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
