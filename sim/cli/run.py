"""`emoe run` (simulate a scenario into a results directory) and `emoe capacity` (what fits under a policy)."""
from __future__ import annotations

import json
from pathlib import Path

from sim.cli.common import (add_force, add_set, default_results_dir, output_file, positive_whole, print_summary,
                            progress, replacing, results_dir, scenario, write_text)


def add_parsers(sub):
    add_run(sub)
    add_capacity(sub)


def add_run(sub):
    s = sub.add_parser("run", help="simulate a scenario and write a results directory")
    s.add_argument("scenario", help="scenario YAML (e.g. scenarios/quickstart.yaml)")
    s.add_argument("-o", "--output", help="results directory (default runs/NAME-TIMESTAMP-TOKEN, a new one)")
    add_set(s, "override a scenario key, e.g. --set policy.capacity=0.4 (repeatable)")
    add_force(s)
    s.set_defaults(func=run)


def run(a):
    from sim.run import run_scenario
    sc = scenario(a)
    out = results_dir(Path(a.output) if a.output else default_results_dir(sc["name"]), a.force)
    bar = progress(None, "requests")
    try:
        res = run_scenario(sc, progress=bar.update)
    finally:
        bar.close()
    with replacing(out):
        path = res.write(out)
    print_summary(res.summary, f"{sc['name']}: policy {sc['policy']['name']}, scheduler {sc['scheduler']['name']}, "
                               f"{res.meta['wall_time_s']:.2f}s wall")
    if res.meta["stopped_early"]:
        print(f"  note: {res.meta['stopped_early']}")
    if "estimated_quality_source" in res.summary:
        print(f"  (quality: {res.summary['estimated_quality_source']}; calibration: "
              f"{res.summary['estimated_quality_calibration']})")
    print(f"results in {path}")


def add_capacity(sub):
    s = sub.add_parser("capacity", help="largest batch and longest prompt that fit under the scenario's policy")
    s.add_argument("scenario")
    add_set(s)
    s.add_argument("--seq-len", type=positive_whole, default=512, help="tokens per request for the batch figure")
    s.add_argument("--compare", action="append", metavar="POLICY",
                   help="also show this policy (YAML, e.g. resident); the last one is the ratio baseline")
    s.add_argument("--json", metavar="OUT")
    add_force(s)
    s.set_defaults(func=show_capacity)


def show_capacity(a):
    from sim.capacity import capacity
    from sim.policies import make_policy
    from sim.run import build
    from sim.scenario import load_scenario
    if a.json:
        output_file(a.json, "--json", a.force)
    sc = scenario(a)
    model, hw, _, policy, _ = build(sc, trace=False)
    specs = [sc["policy"]]
    for extra in (a.compare or []):
        specs.append(load_scenario(a.scenario, (a.set or []) + [f"policy={extra}"])["policy"])
    rows = []
    for spec in specs:
        base_dir = Path(sc.get("_base_dir", "."))
        pol = policy if spec is sc["policy"] else make_policy(spec, model, None, sc["seed"], base_dir)
        rows.append(capacity(model, hw, pol, sc["limits"], a.seq_len))
    base = rows[-1] if len(rows) > 1 else None
    print(f"{model.name} on {hw.count} x {hw.name}: budget {rows[0]['budget_bytes'] / 1e9:.1f} GB "
          f"({sc['limits']['memory_utilization']:.0%} of {hw.total_memory / 1e9:.1f} GB)")
    print(f"{'policy':14s}{'experts':>9s}{'expert GB':>10s}{'free GB':>9s}{'longest prompt':>16s}"
          f"{'batch@' + str(a.seq_len):>11s}{'GB@' + str(a.seq_len):>9s}")
    for r in rows:
        ratio = "" if base is None or r is base else \
            f"   ({r['longest_prompt_tokens'] / max(base['longest_prompt_tokens'], 1):.1f}x prompt, " \
            f"{r['largest_batch'] / max(base['largest_batch'], 1):.1f}x batch vs {base['policy']})"
        print(f"{r['policy']:14s}{r['experts_resident']:>9d}{r['expert_bytes'] / 1e9:10.1f}{r['free_bytes'] / 1e9:9.1f}"
              f"{r['longest_prompt_tokens']:16d}{r['largest_batch']:11d}{r['memory_at_seq_len_bytes'] / 1e9:9.1f}"
              + ratio)
    if a.json:
        print(f"wrote {write_text(a.json, json.dumps(rows, indent=2), '--json')}")
