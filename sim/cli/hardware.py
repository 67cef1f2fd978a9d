"""Commands on real hardware (PyTorch, imported only when one runs): `emoe replay`, `emoe profile`,
`emoe compare` (simulated vs replayed) and `emoe confirm` (all of it, with a verdict)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sim.cli.common import (Registry, add_force, add_set, default_results_dir, needs, output_file, positive_whole,
                            print_summary, progress, replacing, results_dir, scenario)
from traces.errors import UserError

CONFIRM_FAILED = 4   # exit status of `emoe confirm` when a tolerance is exceeded (results written)
CONFIRM_INCONCLUSIVE = 5   # ... when only the device's own replays spread more than a tolerance
DTYPES = Registry("replay.options", "DTYPE_NAMES")


def add_parsers(sub):
    for add in (add_replay, add_profile, add_compare, add_confirm):
        add(sub)


def default_tolerances() -> str:
    from replay.options import DEFAULT_TOLERANCES
    return ",".join(f"{k}={v:g}" for k, v in DEFAULT_TOLERANCES.items())


def add_device(s, scale_help="divide hidden sizes by this (CPU runs of big models)"):
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--scale", type=positive_whole, default=1, help=scale_help)
    s.add_argument("--dtype", choices=DTYPES, metavar="DTYPE",
                   help="%(choices)s (default bfloat16 on cuda, float32 on cpu)")


def check_device(a):
    """--device and --scale of replay and profile, before any scenario or model loads."""
    import torch
    if a.device != "cpu" and not a.device.startswith("cuda"):
        raise UserError(f"--device {a.device}: use cpu or cuda (cuda:N)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if a.scale < 1:
        raise UserError(f"--scale must be a positive integer, got {a.scale}")


def add_replay(sub):
    s = sub.add_parser("replay", help="run a scenario on real hardware (PyTorch) with the same policy objects")
    s.add_argument("scenario", help="scenario YAML, a sweep point directory, or the file `emoe choose -o` wrote")
    add_device(s)
    s.add_argument("--weights", metavar="DIR",
                   help="a Hugging Face checkpoint (Mixtral layout) of the scenario's model: real weights, the "
                        "trace's prompt text as tokens, the model's own router and greedy generation")
    s.add_argument("-o", "--output", help="results directory (default runs/NAME-replay-TIMESTAMP-TOKEN, a new one)")
    add_set(s)
    add_force(s)
    s.set_defaults(func=replay_on_device)


def replay_on_device(a):
    with needs("replay", "replay"):
        from replay.run import ReplayOOM, replay_scenario
    check_device(a)
    sc = scenario(a)
    out = results_dir(Path(a.output) if a.output else default_results_dir(sc["name"], "replay"), a.force)
    from replay.weights import WeightsError
    bar = progress(None, "requests replayed")      # a replay runs in real time: minutes on a CPU
    try:
        res = replay_scenario(sc, a.device, a.scale, a.dtype, weights=a.weights, progress=bar.update)
    except (ReplayOOM, WeightsError) as e:
        raise UserError(str(e)) from None
    finally:
        bar.close()
    with replacing(out):
        path = res.write(out)
    print_summary(res.summary, f"replay of {sc['name']} on {res.meta['device_name']} ({res.meta['dtype']}, "
                               f"scale 1/{a.scale}): {res.meta['wall_time_s']:.2f}s wall")
    s = res.summary
    if s.get("h2d_bytes_per_s"):
        print(f"  host-to-device copies     {s['h2d_copies']} ({s['h2d_bytes'] / 1e9:.3f} GB) at "
              f"{s['h2d_bytes_per_s'] / 1e9:.2f} GB/s")
    if "router_agreement" in s:
        print(f"  real router               {s['router_agreement']:.1%} of routes as in the trace; "
              f"{s['router_misses']} picks the policy had not served, {s['router_reroutes']} rerouted; "
              f"generations in {path / 'generations.jsonl'}")
    print(f"results in {path}  (simulate the same model: emoe run {path / 'scenario.yaml'})")
    if s.get("error"):
        print(f"emoe: error: {s['error']}; the results up to that point are in {path}", file=sys.stderr)
        raise SystemExit(3)


def add_profile(sub):
    s = sub.add_parser("profile", help="measure copy bandwidth and layer costs; write a hardware profile")
    s.add_argument("--scenario", help="measure layer costs for this scenario's model (and calibrate the step)")
    add_device(s, scale_help="as for `emoe replay`")
    s.add_argument("--max-copy-mb", type=positive_whole, default=64, help="largest copy size measured (MiB)")
    s.add_argument("--threads", type=positive_whole, help="torch threads (default: torch's); the replay uses the same")
    add_set(s)
    s.add_argument("-o", "--output", required=True)
    add_force(s)
    s.set_defaults(func=measure_profile)


def measure_profile(a):
    with needs("profile", "replay"):
        import torch

        from replay.model import scaled_spec
        from replay.profile import run_profile, write_profile
        from replay.run import DTYPES
    from traces.model_shape import get_model
    output_file(a.output, "-o", a.force)
    check_device(a)
    dtype_name = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    dtype = DTYPES[dtype_name]
    spec, calib = None, None
    if a.scenario:
        sc = scenario(a)
        spec = scaled_spec(get_model(sc["model"]), a.scale, torch.tensor([], dtype=dtype).element_size())
        calib = calibration_scenario(a, sc)
    else:
        spec = scaled_spec(get_model("tiny"), 1, torch.tensor([], dtype=dtype).element_size())
    max_bytes = a.max_copy_mb * 2 ** 20
    prof = run_profile(a.device, spec, dtype, calib, max_bytes, a.scale, threads=a.threads,
                       say=lambda m: print(m, file=sys.stderr, flush=True))
    path = write_profile(prof, a.output)
    hw, m = prof["hardware"], prof["measured"]
    print(f"{prof['info']['device']}: host-to-device {hw['h2d_bytes_per_s'] / 1e9:.2f} GB/s, "
          f"{hw['h2d_latency_s'] * 1e6:.1f} us per copy")
    print(f"model {m['model']['name']}: expert {m['expert_s']['a'] * 1e6:.1f} us + "
          f"{m['expert_s']['b'] * 1e6:.2f} us/token; "
          f"attention {m['attention_s']['a'] * 1e6:.1f} us + {m['attention_s']['b'] * 1e6:.2f} us/token; "
          f"step {m['step_s']['a'] * 1e3:.2f} ms")
    print(f"wrote {path} ({prof['info']['seconds']}s, {prof['info']['threads']} threads); use it with  "
          f"hardware: {{profile: {path}}}")
    if prof["info"]["noisy"]:
        parts = ", ".join(f"{k} {v:.0%}" for k, v in prof["info"]["noisy"].items())
        print(f"emoe: warning: timings varied by {parts} between repeats (load average "
              f"{prof['info']['load_average']}); this profile is too noisy to trust - rerun it on an idle machine",
              file=sys.stderr)


def calibration_scenario(a, sc: dict) -> dict:
    """The scenario's model on a short all-at-once workload: the step-overhead fit's data."""
    from sim.scenario import load_scenario
    w = sc["workload"]
    over = [("policy", {"name": "resident"}), ("workload.arrival", {"process": "batch"}),
            ("workload.requests", min(w.get("requests") or 24, 24))]
    return load_scenario(a.scenario, (a.set or []) + over)


def add_compare(sub):
    s = sub.add_parser("compare", help="simulated vs replayed metrics side by side, with relative errors and a "
                       "verdict")
    s.add_argument("sim", help="results directory of `emoe run`")
    s.add_argument("replay", help="results directory of `emoe replay`")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--tolerance", metavar="NAME=SHARE,...", help="relative tolerances of the verdict (default "
                   f"{default_tolerances()}; a bare number sets all)")
    s.add_argument("--allow-mismatch", action="store_true", help="compare even when the two sides ran different "
                   "models (shape, dtype, scale) or devices")
    s.set_defaults(func=compare_runs)


def compare_runs(a):
    from replay.compare import (check_comparable, compare, compare_generations, format_verdict, json_safe,
                                parse_tolerances, print_comparison, verdict)
    from sim.results import load_results
    tol = parse_tolerances(a.tolerance)
    refusals, warnings = check_comparable(a.sim, a.replay)
    if refusals and not a.allow_mismatch:
        raise UserError(f"{refusals[0]}; simulate what the replay ran (emoe run {Path(a.replay) / 'scenario.yaml'}, "
                        "or emoe confirm), or pass --allow-mismatch")
    table = compare(a.sim, a.replay)
    gens = compare_generations(a.sim, a.replay)
    sim_vs_replay = (Path(a.replay) / "meta.json").exists() and \
        json.loads((Path(a.replay) / "meta.json").read_text()).get("engine") == "replay" and not gens
    rows = verdict(table, tol, load_results(a.replay)["summary"]) if sim_vs_replay else []
    if a.json:
        records = json.loads(table.reset_index().to_json(orient="records"))
        if gens:
            records += [{"metric": k, "value": v} for k, v in gens.items()]
        records += [{**r, "metric": f"verdict:{r['check']}"} for r in rows]
        records += [{"metric": "not_comparable", "value": w} for w in refusals]
        records += [{"metric": "warning", "value": w} for w in warnings]
        print(json.dumps(json_safe(records), indent=2, default=float))
    else:
        print_comparison(table, a.sim, a.replay)
        if gens:
            print(f"generated tokens ({gens['requests_compared']} requests): "
                  f"{gens['generations_identical']:.1%} identical, {gens['generation_prefix_agreement']:.1%} "
                  "agree before the first difference")
        if rows:
            print(format_verdict(rows, refusals, warnings))
        else:
            for w in refusals + warnings:
                print(f"warning: {w}")


def add_confirm(sub):
    s = sub.add_parser("confirm", help="profile, replay, simulate the replay's exact model and compare: a pass/fail "
                       f"verdict per metric (exit {CONFIRM_FAILED} when a tolerance is exceeded, "
                       f"{CONFIRM_INCONCLUSIVE} when only the device's own replays spread more than it)")
    s.add_argument("scenario", help="scenario YAML, a sweep point directory, or the file `emoe choose -o` wrote")
    add_device(s)
    s.add_argument("--profile", metavar="PROFILE.yaml", help="reuse this profile (it must be for the replayed "
                   "model on this kind of device) instead of profiling")
    s.add_argument("--tolerance", metavar="NAME=SHARE,...", help="relative tolerances (default "
                   f"{default_tolerances()}; a bare number sets all)")
    s.add_argument("--threads", type=positive_whole,
                   help="torch threads for the profile and the CPU replay (default: torch's)")
    s.add_argument("--max-copy-mb", type=positive_whole, default=64, help="largest copy size profiled (MiB)")
    s.add_argument("--replays", type=positive_whole, default=1,
                   help="replay the scenario N times: the verdict takes their median; where they differ by more "
                   "than the tolerance, a miss within it of their interquartile band is inconclusive "
                   f"(exit {CONFIRM_INCONCLUSIVE})")
    add_set(s)
    s.add_argument("-o", "--output", help="directory for everything (default runs/NAME-confirm-TIMESTAMP-TOKEN)")
    add_force(s)
    s.set_defaults(func=confirm_scenario)


def confirm_scenario(a):
    with needs("confirm", "replay"):
        from replay.compare import format_verdict, parse_tolerances
        from replay.confirm import confirm
        from replay.run import ReplayOOM
    tol = parse_tolerances(a.tolerance)
    sc = scenario(a)
    out = results_dir(Path(a.output) if a.output else default_results_dir(sc["name"], "confirm"), a.force)
    try:
        with replacing(out):   # confirm writes as it goes: an earlier directory (--force) waits aside
            c = confirm(sc, out, a.device, a.scale, a.dtype, a.profile, tol, a.threads, a.max_copy_mb,
                        replays=a.replays)
    except ReplayOOM as e:
        raise UserError(str(e)) from None
    print(format_verdict(c.rows, c.refusals, c.warnings))
    replays = ", ".join(Path(d).name + "/" for d in c.report["replays"])
    print(f"everything in {c.out}  (comparison.md, comparison.json, verdict.txt, profile.yaml, {replays}, sim/)")
    if c.replay_error:
        f = c.report["replay_failed"]
        which = f"replay {f['replay']} of {f['of']}: " if f["of"] > 1 else ""
        where = f"; the results up to that point are in {f['dir']}" if f["dir"] else ""
        print(f"emoe: error: {which}{c.replay_error}{where}", file=sys.stderr)
        return 3
    return 0 if c.passed else CONFIRM_INCONCLUSIVE if c.inconclusive else CONFIRM_FAILED
