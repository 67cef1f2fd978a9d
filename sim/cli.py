"""The `emoe` command line: one subcommand per job, each delegating to its module."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from traces.errors import UserError, message


class _Parser(argparse.ArgumentParser):
    """Argument mistakes as one line, like every other user error (the usage is in --help)."""

    def error(self, msg):
        print(f"{self.prog}: error: {msg} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _preset(name: str, option: str = "--model"):
    """A model preset named on the command line."""
    from traces.model_shape import get_model
    try:
        return get_model(name)
    except (KeyError, ValueError, TypeError) as e:   # get_model's own input checks
        raise UserError(f"{option}: {message(e)}") from None


def _write_text(path, text: str, option: str) -> Path:
    """Write an output file atomically (a crash leaves the old file or the new one, never half);
    an unwritable path is the user's to fix, named by its option."""
    from sim.atomic import write_text
    if Path(path).is_dir():
        raise UserError(f"{option} {path}: is a directory; give a file name")
    try:
        return write_text(path, text)
    except (PermissionError, NotADirectoryError, FileExistsError) as e:   # the place, not the program
        raise UserError(f"{option} {path}: cannot write there ({e.strerror}); choose another path") from None


def _progress(total: int, desc: str):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="req", disable=None, leave=False)
    return bar


def _parse_tasks(spec: str):
    """'qa,code' or 'qa:2,code:1' -> (tasks, weights)."""
    tasks, weights = [], []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        tasks.append(name)
        try:
            weights.append(float(w) if w else 1.0)
        except ValueError:
            raise UserError(f"--tasks: weight of '{name}' must be a number, got '{w}'") from None
    if not tasks:
        raise UserError("--tasks: give at least one task")
    return tasks, weights


# ---- trace ------------------------------------------------------------------
def cmd_trace_synth(a):
    from traces.format import load_trace, save_trace
    from traces.synth import synthesize
    tasks, weights = _parse_tasks(a.tasks) if a.tasks else (None, None)
    like = load_trace(a.like, validate_routing=False) if a.like else None
    t0 = time.time()
    bar = _progress(like.n_requests if like is not None else a.requests, "synth")
    overrides = {}
    for kv in a.knob or []:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = float(v)
        except ValueError:
            raise UserError(f"--knob {kv}: expected NAME=NUMBER") from None
    try:
        if tasks is None and a.like is None and a.profile in ("real", "paper"):
            tasks = ["qa", "summarization", "code", "math", "conversation"]
        tr = synthesize(a.model, tasks, a.requests, seed=a.seed, profile=a.profile, task_weights=weights,
                        rate=a.rate, router_probs=a.router_probs, prompt_mean=a.prompt_len,
                        output_mean=a.output_len, progress=bar.update, like=like, **overrides)
    except TypeError as e:
        raise UserError(f"--knob: {e}; knobs are the RoutingProfile fields in traces/profile.py") from None
    except KeyError as e:   # an unknown --model preset (synthesize checks the rest as UserErrors)
        raise UserError(f"--model: {message(e)}") from None
    finally:
        bar.close()
    path = save_trace(tr, a.output, compress=a.compress)
    print(f"wrote {path}: {tr.n_requests} requests, {tr.n_tokens} tokens, model {tr.model} "
          f"({tr.n_layers} layers x {tr.n_experts} experts, top-{tr.top_k}) in {time.time() - t0:.1f}s")


def cmd_trace_import(a):
    from traces.format import save_trace
    from traces.importer import import_trace
    tr, report = import_trace(a.file, _preset(a.model), a.format, repair=a.repair, task=a.task)
    path = save_trace(tr, a.output, compress=a.compress)
    print("\n".join(report.lines()))
    print(f"wrote {path}: {tr.n_requests} requests, {tr.n_tokens} tokens")


def cmd_trace_compare(a):
    from traces.compare import compare_paths, format_report
    group = "auto" if a.group_size == "auto" else _positive_int(a.group_size, "--group-size")
    rep = compare_paths(a.a, a.b, a.tokens, a.tol, group)
    print(format_report(rep))
    if a.json:
        print(f"wrote {_write_text(a.json, json.dumps(rep, indent=2, default=float), '--json')}")


def _positive_int(v: str, option: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{option}: expected a positive whole number or 'auto', got '{v}'")
    return n


def cmd_trace_fit(a):
    from traces.fit import fit_profile
    from traces.format import load_trace
    from traces.profile import save_profile
    tr = load_trace(a.trace)
    t0 = time.time()
    prof = fit_profile(tr, name=a.name, tokens=a.tokens, rounds=a.rounds, replicas=a.replicas, seed=a.seed,
                       source=Path(a.trace).name,
                       progress=lambda i, score: print(f"  round {i + 1}: rms relative error {score:.3f}", flush=True))
    path = save_profile(prof, a.output)
    fit = prof.fit
    print(f"wrote {path}: profile '{prof.name}' for {tr.n_layers} layers x {tr.n_experts} experts, "
          f"{len(prof.tasks)} task(s), in {time.time() - t0:.1f}s; best round {fit['best_round'] + 1} of "
          f"{fit['rounds']}, rms relative error {fit['rms_relative_error']:.3f}; gates {fit['gates']}")
    worst = sorted(fit["relative_errors"].items(), key=lambda kv: -abs(kv[1]))[:3]
    print("  largest differences: " + ", ".join(f"{k} {v:+.1%}" for k, v in worst))
    print(f"  check it: emoe trace synth --profile {path} --like {a.trace} -o SYN.npz && "
          f"emoe trace compare SYN.npz {a.trace} --tokens {a.tokens}")


def cmd_trace_info(a):
    from traces.format import load_trace
    tr = load_trace(a.trace)
    print(f"{a.trace}: model {tr.model}, {tr.n_layers} MoE layers x {tr.n_experts} experts, top-{tr.top_k}")
    print(f"  {tr.n_requests} requests, {tr.n_tokens} tokens "
          f"(prompt {int(tr.prompt_tokens.sum())}, output {int(tr.output_tokens.sum())}), "
          f"router probs: {'yes' if tr.router_probs is not None else 'no'}, "
          f"arrivals: {'yes' if tr.arrival_s is not None else 'no'}")
    for task in tr.tasks:
        sel = tr.task == task
        print(f"  {task:15s} {int(sel.sum()):6d} requests  prompt mean {tr.prompt_tokens[sel].mean():7.1f}  "
              f"output mean {tr.output_tokens[sel].mean():7.1f}")


def cmd_trace_stats(a):
    from traces.format import load_trace
    from traces.stats import trace_stats
    tr = load_trace(a.trace)
    s = trace_stats(tr, a.tokens)
    keys = ["gini", "top_share", "temporal_reuse", "cross_layer_correlation", "inter_prompt_correlation",
            "distinct_experts"]
    print(f"{a.trace} ({s['tokens_phase']} tokens; definitions in README 'Trace statistics')")
    print(f"{'':16s}" + "".join(f"{k[:14]:>15s}" for k in ["requests"] + keys))
    rows = [("ALL", s)] + list(s["per_task"].items())
    for name, d in rows:
        print(f"{name:16s}{d['requests']:15d}" + "".join(f"{d[k]:15.3f}" for k in keys))
    print(f"task specialisation (mean JS divergence, bits): {s['specialisation']:.4f}")
    cols = [("req_gini", "request_gini"), ("eff_exp", "effective_experts")] + \
        [(f"nmi{d}", ("nmi_by_distance", d)) for d in ("1", "2", "4", "8")] + \
        [(f"reuse{d}", ("reuse_by_distance", d)) for d in ("1", "2", "4", "8", "16")] + \
        [("reuseL0", "reuse_first_layer"), ("reuseLast", "reuse_last_layers"), ("gate50", ("gate_quantiles", "0.5")),
         ("gate>.9", "gate_top1_over_0_9"), ("JSp|d", "prompt_decode_divergence")]
    get = lambda d, key: d[key] if isinstance(key, str) else d[key[0]][key[1]]
    print("structure (per request where it applies):")
    print(f"{'':16s}" + "".join(f"{c:>10s}" for c, _ in cols))
    for name, d in rows:
        print(f"{name:16s}" + "".join(f"{get(d, key):10.3f}" for _, key in cols))
    if a.json:
        print(f"wrote {_write_text(a.json, json.dumps(s, indent=2, default=float), '--json')}")
    if a.plot:
        from traces.plots import plot_trace
        for p in plot_trace(tr, a.plot, a.tokens):
            print(f"wrote {p}")


def cmd_models(a):
    from traces.model_shape import PRESETS
    print(f"{'preset':20s}{'params':>9s}{'MoE layers':>11s}{'experts':>8s}{'top-k':>6s}{'shared':>7s}"
          f"{'MB/expert':>10s}{'dense GB':>9s}{'experts GB':>11s}{'KV KB/tok':>10s}")
    for m in PRESETS.values():
        print(f"{m.name:20s}{m.total_params / 1e9:8.2f}B{m.n_moe_layers:11d}{m.n_experts:8d}{m.top_k:6d}"
              f"{m.n_shared_experts:7d}{m.bytes_per_expert / 1e6:10.1f}{m.dense_bytes / 1e9:9.2f}"
              f"{m.expert_bytes_total / 1e9:11.2f}{m.kv_bytes_per_token / 1024:10.1f}")


# ---- simulate -------------------------------------------------------------------
SUMMARY_ROWS = [("requests_completed", "requests completed", "{:.0f}"), ("requests_rejected", "rejected", "{:.0f}"),
                ("peak_memory_bytes", "peak memory (GB)", "gb"), ("peak_experts_bytes", "  experts (GB)", "gb"),
                ("peak_kv_bytes", "  KV cache (GB)", "gb"), ("ttft_mean_s", "TTFT mean (s)", "{:.3f}"),
                ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"), ("tpot_mean_s", "TPOT mean (s)", "{:.4f}"),
                ("e2e_mean_s", "end-to-end mean (s)", "{:.3f}"), ("e2e_p99_s", "end-to-end p99 (s)", "{:.3f}"),
                ("throughput_tokens_per_s", "throughput (tok/s)", "{:.1f}"),
                ("slo_attainment", "SLO attainment", "{:.1%}"), ("expert_hit_rate", "expert hit rate", "{:.1%}"),
                ("bytes_loaded", "bytes loaded (GB)", "gb"), ("routing_fidelity", "routing fidelity", "{:.2%}"),
                ("routing_fidelity_sensitive", "  in sensitive layers", "{:.2%}"),
                ("estimated_quality", "est. quality (agreement)", "{:.1%}"),
                ("engine_steps", "engine steps", "{:.0f}")]


def print_summary(s: dict, title: str = ""):
    if title:
        print(title)
    for key, label, fmt in SUMMARY_ROWS:
        v = s.get(key)
        if v is None:
            continue
        print(f"  {label:24s} {v / 1e9:.2f}" if fmt == "gb" else f"  {label:24s} " + fmt.format(v))


def _scenario(a):
    """A scenario YAML, or a directory holding one (a sweep point, a results directory)."""
    from sim.scenario import load_scenario
    path = Path(a.scenario)
    if path.is_dir():
        if not (path / "scenario.yaml").exists():
            raise UserError(f"'{path}' is a directory without scenario.yaml; give a scenario YAML, a sweep "
                            "point directory (SWEEP/points/HASH) or a results directory")
        path = path / "scenario.yaml"
    return load_scenario(path, a.set or [])


def _results_dir(out: Path) -> Path:
    """Refuse, before anything runs, a results directory that is taken or cannot be made:
    a long run must not end by failing to write its results."""
    import os
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: a file of that name exists; give a directory for the results")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"results directory '{out}' exists and is not empty; choose another -o")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"-o {out}: '{parent}' is a file, not a directory; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"-o {out}: cannot write in '{parent}' (permission denied); choose another -o")
    return out


def cmd_run(a):
    from datetime import datetime

    from sim.run import run_scenario
    sc = _scenario(a)
    out = _results_dir(Path(a.output) if a.output else
                       Path("runs") / f"{sc['name']}-{datetime.now():%Y%m%d-%H%M%S}")
    bar = _progress(None, "requests")
    try:
        res = run_scenario(sc, progress=bar.update)
    finally:
        bar.close()
    path = res.write(out)
    print_summary(res.summary, f"{sc['name']}: policy {sc['policy']['name']}, scheduler {sc['scheduler']['name']}, "
                               f"{res.meta['wall_time_s']:.2f}s wall")
    if res.meta["stopped_early"]:
        print(f"  note: {res.meta['stopped_early']}")
    if "estimated_quality_source" in res.summary:
        print(f"  (quality: {res.summary['estimated_quality_source']}; calibration: "
              f"{res.summary['estimated_quality_calibration']})")
    print(f"results in {path}")


def cmd_capacity(a):
    from sim.capacity import capacity
    from sim.policies import make_policy
    from sim.run import build
    sc = _scenario(a)
    model, hw, trace, policy, _ = build(sc, trace=False)
    specs = [sc["policy"]]
    for extra in (a.compare or []):
        from sim.scenario import load_scenario
        specs.append(load_scenario(a.scenario, (a.set or []) + [f"policy={extra}"])["policy"])
    rows = []
    for spec in specs:
        pol = policy if spec is sc["policy"] else make_policy(spec, model, None, sc["seed"])
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
        print(f"wrote {_write_text(a.json, json.dumps(rows, indent=2), '--json')}")


def cmd_sweep(a):
    from sim.sweep import load_sweep, run_sweep
    spec = load_sweep(a.sweep)
    if a.jobs < 1:
        raise UserError("-j must be at least 1")
    t0 = time.time()
    res = run_sweep(spec, jobs=a.jobs, dask=a.dask, output=a.output)
    df = res["table"]
    print(f"sweep {spec['name']}: {len(df)} points, ran {res['ran']}, reused {res['skipped']}, "
          f"failed {res['failed']} in {time.time() - t0:.1f}s; table in {res['output'] / 'table.csv'}")
    for _, row in df[df.status == "failed"].iterrows():
        print(f"  point {row.point} failed: {row.error}")
    if res["failed"]:
        raise SystemExit(1)


def cmd_plot(a):
    from sim import plots
    from sim.results import load_results
    out = Path(a.output)
    written = []
    tables = [Path(p) for p in a.inputs if (Path(p) / "table.csv").exists() or
              (str(p).endswith(".csv") and Path(p).is_file())]
    results = [Path(p) for p in a.inputs if (Path(p) / "summary.json").exists()]
    unknown = [p for p in a.inputs if Path(p) not in tables and Path(p) not in results]
    if unknown:
        raise UserError(f"{unknown[0]}: neither a sweep directory (table.csv) nor a results directory "
                        "(summary.json)")
    import pandas as pd
    kinds = {"memory": plots.memory_vs_experts, "quality": plots.quality_vs_memory, "rate": plots.vs_rate,
             "interval": plots.vs_interval, "pareto": plots.pareto}
    for p in tables:
        try:
            t = pd.read_csv(p if p.suffix == ".csv" else p / "table.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not a sweep table ({message(e)}); make one with `emoe sweep`") from None
        sub = out / (p.stem if p.suffix == ".csv" else p.name) if len(tables) > 1 else out
        if a.kind == "auto":
            written += plots.auto(t, sub)
        elif a.kind in kinds:
            written += plots.save(kinds[a.kind](t), sub, a.kind)
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


# ---- real models (issue 7) ------------------------------------------------------
def cmd_capture(a):
    try:
        from traces.capture import capture_dir
    except ImportError as e:
        raise UserError(f"capture needs torch and transformers ({e}); pip install -e '.[capture]'") from None
    from traces.format import save_trace
    if not (Path(a.model) / "config.json").exists():
        raise UserError(f"--model {a.model}: not a Hugging Face checkpoint directory (no config.json)")
    _prompts(a.prompts)   # its mistakes before the model loads
    t0 = time.time()
    tr = capture_dir(a.model, a.prompts, a.max_new_tokens, a.device, a.batch_size)
    path = save_trace(tr, a.output)
    print(f"wrote {path}: {tr.n_requests} prompts, {tr.n_tokens} tokens, {tr.n_layers} MoE layers x "
          f"{tr.n_experts} experts, top-{tr.top_k} ({time.time() - t0:.1f}s)")


def cmd_prompts(a):
    from traces.prompts import TASKS, heldout_prompts, write_prompts
    tasks = a.tasks.split(",") if a.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if not Path(a.data).is_dir():
        raise UserError(f"--data {a.data}: no such directory; give the corpora directory (../shared/data/corpora)")
    rows = heldout_prompts(a.data, a.per_task, tasks, a.seed)
    print(f"wrote {write_prompts(rows, a.output)}: {len(rows)} prompts ({', '.join(tasks)})")


def _hf_model(path):
    d = Path(path)
    if not (d / "config.json").exists():
        raise UserError(f"--model: '{d}' is not a Hugging Face checkpoint directory (no config.json)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise UserError(f"needs transformers ({e}); pip install -e '.[capture]'") from None
    import torch
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


def _prompts(path) -> list[dict]:
    """A prompts JSONL file; read_prompts only parses, so what it refuses is the file's fault."""
    from traces.capture import read_prompts
    try:
        return read_prompts(path)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts: {message(e)}; build prompt sets with `emoe prompts`") from None


def _examples(path):
    rows = _prompts(path)
    missing = [i for i, r in enumerate(rows) if "reference" not in r]
    if missing:
        raise UserError(f"{path}: line {missing[0] + 1} has no 'reference' continuation; build prompt sets "
                        "with `emoe prompts`")
    return rows


def _floats(text, name, cast=float):
    try:
        return [cast(x) for x in str(text).split(",")]
    except ValueError:
        raise UserError(f"--{name}: expected comma-separated numbers, got '{text}'") from None


def cmd_accuracy(a):
    from replay.quality import accuracy
    model, tok = _hf_model(a.model)
    examples = _examples(a.prompts)
    rows = []
    for cap in _floats(a.capacity, "capacity"):
        for p in _floats(a.interval, "interval", int):
            res = accuracy(model, tok, examples, a.policy, cap, p, a.seed)
            for task, r in res.items():
                rows.append(dict(policy=a.policy, capacity=cap, interval=p, task=task, **r))
    import pandas as pd
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if a.json:
        print(f"wrote {_write_text(a.json, df.to_json(orient='records', indent=2), '--json')}")


def cmd_calibrate(a):
    from sim import quality
    calib = quality.from_accuracy_json(a.accuracy_json, a.model_name)
    path = quality.write(calib, a.output)
    print(f"wrote {path}: {len(calib['curves']) - 1} tasks from {a.accuracy_json}; use it with "
          f"`quality: {{calibration: {path}}}` in a scenario, or {quality.ENV}={path}")


def cmd_sensitivity(a):
    import yaml

    from replay.quality import sensitivity
    model, tok = _hf_model(a.model)
    res = sensitivity(model, tok, _examples(a.prompts), a.threshold, a.seed)
    table = {"model": Path(a.model).name, "threshold": a.threshold, "default": 1.0,
             "tasks": res["tasks"], "measured": {t: [round(x, 4) for x in c] for t, c in res["curves"].items()}}
    _write_text(a.output, yaml.safe_dump(table, sort_keys=False), "-o")
    for task, curve in res["curves"].items():
        print(f"{task:15s} agreement with layers 0..m-1 randomised: " + " ".join(f"{x:.2f}" for x in curve)
              + f"   s = {res['tasks'][task]}")
    print(f"wrote {a.output} (use it as policy.sensitivity)")


def cmd_choose(a):
    import pandas as pd

    from sim import choose as ch
    from sim import plots
    objective = a.maximise or a.minimise or "memory"
    if a.output and Path(a.output).exists() and not a.force:
        raise UserError(f"'{a.output}' exists; choose another -o or add --force (nothing was overwritten)")
    c = ch.choose(a.sweep_dir, a.slo_attainment, a.min_quality, a.max_memory_gb, objective)
    n_feasible = int(c.pooled.feasible.sum())
    print(f"{len(c.pooled)} configurations, {n_feasible} meet SLO attainment >= {a.slo_attainment:.0%} and "
          f"estimated quality >= {a.min_quality:.0%}; Pareto set (memory, latency, quality), best by {objective}:")
    if c.chosen is None:
        best = c.pooled.sort_values("slo_attainment", ascending=False).iloc[0]
        raise UserError(f"no configuration of {a.sweep_dir} meets the constraints (best SLO attainment "
                        f"{best.slo_attainment:.1%} by {best.label}); relax --slo-attainment/--min-quality or "
                        "sweep more capacity")
    print(ch.format_table(c.pareto))
    q = c.pooled.get("estimated_quality")
    table = ch.load_table(a.sweep_dir)
    if "estimated_quality_source" in table and table.estimated_quality_source.notna().any():
        print(f"(quality: {table.estimated_quality_source.dropna().iloc[0]})")
    elif q is None or q.isna().all():
        print("(no quality calibration: quality not constrained)")
    print(f"chosen: {c.chosen['label']} capacity {c.chosen['policy_capacity']:g}, point {c.chosen['hash']}")
    if a.output:
        path = ch.write_chosen(a.sweep_dir, c.chosen, a.output, c.constraints)
        print(f"wrote {path}  (replay it: emoe replay {path} --device cuda)")
    if a.plot:
        # One point per configuration (seeds pooled, with their 95% intervals), as chosen from.
        pooled = c.pooled.assign(estimated_quality_source=table.get("estimated_quality_source", pd.Series()).iloc[0]
                                 if "estimated_quality_source" in table else None)
        written = plots.save(plots.pareto(pooled, a.slo_attainment, a.min_quality), a.plot, "pareto")
        print(f"wrote {written[0]}")


# ---- replay ---------------------------------------------------------------------
def _check_device(a):
    """--device and --scale of replay and profile, before any scenario or model loads."""
    import torch
    if a.device != "cpu" and not a.device.startswith("cuda"):
        raise UserError(f"--device {a.device}: use cpu or cuda (cuda:N)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if a.scale < 1:
        raise UserError(f"--scale must be a positive integer, got {a.scale}")


def cmd_replay(a):
    from datetime import datetime
    try:
        from replay.run import ReplayOOM, replay_scenario
    except ImportError as e:
        raise UserError(f"replay needs torch ({e}); install with: pip install torch==2.13.0 && "
                        "pip install -e '.[replay]'") from None
    _check_device(a)
    sc = _scenario(a)
    out = _results_dir(Path(a.output) if a.output else
                       Path("runs") / f"{sc['name']}-replay-{datetime.now():%Y%m%d-%H%M%S}")
    from replay.weights import WeightsError
    try:
        res = replay_scenario(sc, a.device, a.scale, a.dtype, weights=a.weights)
    except (ReplayOOM, WeightsError) as e:
        raise UserError(str(e)) from None
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


def cmd_profile(a):
    try:
        import torch

        from replay.model import scaled_spec
        from replay.profile import run_profile, write_profile
        from replay.run import DTYPES
    except ImportError as e:
        raise UserError(f"profile needs torch ({e}); pip install torch==2.13.0") from None
    _check_device(a)
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads must be at least 1, got {a.threads}")
    dtype_name = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    dtype = DTYPES[dtype_name]
    spec, calib = None, None
    if a.scenario:
        from traces.model_shape import get_model
        sc = _scenario(a)
        spec = scaled_spec(get_model(sc["model"]), a.scale, torch.tensor([], dtype=dtype).element_size())
        calib = load_calibration(a, sc)
    else:
        from traces.model_shape import get_model
        spec = scaled_spec(get_model("tiny"), 1, torch.tensor([], dtype=dtype).element_size())
    max_bytes = a.max_copy_mb * 2 ** 20
    prof = run_profile(a.device, spec, dtype, calib, max_bytes, a.scale, threads=a.threads)
    path = write_profile(prof, a.output)
    hw, m = prof["hardware"], prof["measured"]
    print(f"{prof['info']['device']}: host-to-device {hw['h2d_bytes_per_s'] / 1e9:.2f} GB/s, "
          f"{hw['h2d_latency_s'] * 1e6:.1f} us per copy")
    print(f"model {m['model']['name']}: expert {m['expert_s']['a'] * 1e6:.1f} us + {m['expert_s']['b'] * 1e6:.2f} us/token; "
          f"attention {m['attention_s']['a'] * 1e6:.1f} us + {m['attention_s']['b'] * 1e6:.2f} us/token; "
          f"step {m['step_s']['a'] * 1e3:.2f} ms")
    print(f"wrote {path} ({prof['info']['seconds']}s, {prof['info']['threads']} threads); use it with  "
          f"hardware: {{profile: {path}}}")
    if prof["info"]["noisy"]:
        parts = ", ".join(f"{k} {v:.0%}" for k, v in prof["info"]["noisy"].items())
        print(f"emoe: warning: timings varied by {parts} between repeats (load average "
              f"{prof['info']['load_average']}); this profile is too noisy to trust - rerun it on an idle machine",
              file=sys.stderr)


def load_calibration(a, sc: dict) -> dict:
    """The scenario's model on a short all-at-once workload: the step-overhead fit's data."""
    from sim.scenario import load_scenario
    w = sc["workload"]
    over = [("policy", {"name": "resident"}), ("workload.arrival", {"process": "batch"}),
            ("workload.requests", min(w.get("requests") or 24, 24))]
    return load_scenario(a.scenario, (a.set or []) + over)


def cmd_compare(a):
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


CONFIRM_FAILED = 4   # exit status of `emoe confirm` when a tolerance is exceeded (results written)


def cmd_confirm(a):
    try:
        from replay.compare import format_verdict, parse_tolerances
        from replay.confirm import confirm
        from replay.run import ReplayOOM
    except ImportError as e:
        raise UserError(f"confirm needs torch ({e}); pip install torch==2.13.0 && pip install -e '.[replay]'") from None
    from datetime import datetime
    tol = parse_tolerances(a.tolerance)
    sc = _scenario(a)
    out = Path(a.output) if a.output else Path("runs") / f"{sc['name']}-confirm-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        c = confirm(sc, out, a.device, a.scale, a.dtype, a.profile, tol, a.threads, a.max_copy_mb)
    except ReplayOOM as e:
        raise UserError(str(e)) from None
    print(format_verdict(c.rows, c.refusals, c.warnings))
    print(f"everything in {c.out}  (comparison.md, comparison.json, verdict.txt, profile.yaml, replay/, sim/)")
    if c.replay_error:
        print(f"emoe: error: {c.replay_error}; the results up to that point are in {c.out / 'replay'}", file=sys.stderr)
        return 3
    return 0 if c.passed else CONFIRM_FAILED


# ---- predictors -----------------------------------------------------------------
def cmd_predictor_train(a):
    from sim.predictors import TRAINABLE, make_predictor
    from sim.predictors.evaluate import split_requests
    from traces.format import load_trace
    if a.kind not in TRAINABLE:
        raise UserError(f"--kind must be one of {', '.join(TRAINABLE)}, got '{a.kind}'")
    tr = load_trace(a.trace)
    try:
        train_idx, eval_idx = split_requests(tr, a.holdout, a.seed)
    except ValueError as e:   # its only errors: a holdout out of range or too large for the trace
        raise UserError(f"--holdout: {message(e)}") from None
    t0 = time.time()
    pred = make_predictor(a.kind).fit(tr, train_idx)
    out = pred.save(a.output)
    print(f"trained {a.kind} on {len(train_idx)} requests of {a.trace} in {time.time() - t0:.1f}s "
          f"({len(eval_idx)} held out); wrote {out}")


def _predictor_file(path):
    """A predictor file named on the command line: what cannot be read as one is the file's fault."""
    import zipfile

    from sim.predictors import load_predictor
    if not Path(path).is_file():
        raise UserError(f"predictor file '{path}' does not exist; train one with `emoe predictor train TRACE -o FILE`")
    try:
        return load_predictor(path)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a predictor file from `emoe predictor train` ({message(e)})") from None


def cmd_predictor_eval(a):
    from sim.predictors.evaluate import evaluate, summary_by_layer
    from traces.format import load_trace
    pred = _predictor_file(a.predictor)
    tr = load_trace(a.trace)
    if (tr.n_layers, tr.n_experts) != (pred.L, pred.E):
        raise UserError(f"predictor is for {pred.L} layers x {pred.E} experts, trace has "
                        f"{tr.n_layers} x {tr.n_experts}")
    from sim.predictors.overlap import seen_requests
    held = np.setdiff1d(np.arange(tr.n_requests), seen_requests(tr, pred.train_ids, pred.train_digests))
    if not len(held):
        raise UserError("every request of this trace was used to train the predictor; evaluate on another trace")
    df = evaluate(pred, tr, held, a.top)
    by_layer = summary_by_layer(df)
    print(f"{pred.kind} on {len(held)} held-out requests of {a.trace} (top {a.top or max(tr.n_experts // 2, 1)} "
          f"experts per layer predicted)")
    print(by_layer.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"mean  precision {df.precision.mean():.3f}  recall {df.recall.mean():.3f}  f1 {df.f1.mean():.3f}  "
          f"coverage {df.coverage.mean():.3f}")
    if a.json:
        _write_text(a.json, json.dumps(dict(kind=pred.kind, requests=len(held), **{
            k: float(df[k].mean()) for k in ("precision", "recall", "f1", "coverage")},
            per_layer=by_layer.reset_index().to_dict(orient="records")), indent=2), "--json")


# ---- parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emoe", description="Simulate and replay memory-efficient MoE inference "
                                "(eMoE and baselines) from routing traces.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tr = sub.add_parser("trace", help="make, import, inspect and measure routing traces")
    tsub = tr.add_subparsers(dest="trace_command", metavar="ACTION")
    tsub.required = True
    s = tsub.add_parser("synth", help="generate a synthetic trace calibrated to real routing")
    s.add_argument("--model", help="model preset (see `emoe models`); a fitted profile names its own")
    s.add_argument("--tasks", help="comma-separated tasks, optionally weighted: qa:2,code:1 (default: "
                   "qa,summarization,code,math,conversation, or a fitted profile's tasks and shares)")
    s.add_argument("--requests", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--profile", default="real", help="routing profile: real (fitted to real Mixtral routing), "
                   "paper (the paper's recurrence), or a PROFILE.yaml from `emoe trace fit`")
    s.add_argument("--like", metavar="TRACE", help="copy each request's task and lengths (and arrivals) from "
                   "this trace: synthetic routing at exactly its shape")
    s.add_argument("--rate", type=float, help="write Poisson arrival times at this rate (req/s)")
    s.add_argument("--prompt-len", type=float, help="override every task's mean prompt tokens")
    s.add_argument("--output-len", type=float, help="override every task's mean output tokens")
    s.add_argument("--router-probs", action="store_true", help="also store full router probabilities")
    s.add_argument("--knob", action="append", metavar="NAME=VALUE",
                   help="override one routing-profile knob, e.g. request_deviation=0.3")
    s.add_argument("--compress", action="store_true", help="deflate the file (smaller, slower to load)")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_trace_synth)

    s = tsub.add_parser("import", help="convert routing dumps (profiler rows, vLLM, Megatron) to a trace")
    s.add_argument("file")
    s.add_argument("--model", required=True)
    s.add_argument("--format", default="auto", choices=["auto", "rows", "vllm", "megatron"],
                   help="rows: per-(request, layer, token) profiler JSONL; vllm: --enable-return-routed-experts "
                   "responses or outputs; megatron: --moe-routing-trace-path records (default: detected)")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed (dropped or renumbered rows, "
                   "constant positions, repeated ids, missing routes) and report every repair")
    s.add_argument("--task", help="task label for records that carry none (vllm, megatron)")
    s.add_argument("--compress", action="store_true")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_trace_import)

    s = tsub.add_parser("info", help="summarise a trace (shape, requests, lengths per task)")
    s.add_argument("trace")
    s.set_defaults(func=cmd_trace_info)

    s = tsub.add_parser("stats", help="routing statistics per task and overall")
    s.add_argument("trace")
    s.add_argument("--tokens", default="all", choices=["all", "prompt", "decode"])
    s.add_argument("--json", metavar="OUT", help="write all statistics as JSON")
    s.add_argument("--plot", metavar="DIR", help="write heatmaps (PNG and SVG)")
    s.set_defaults(func=cmd_trace_stats)

    s = tsub.add_parser("compare", help="two traces' routing statistics side by side, each with a verdict")
    s.add_argument("a", help="trace (.npz) or statistics JSON")
    s.add_argument("b", help="trace (.npz), statistics JSON, or reference:mixtral-8x7b-instruct (real figures)")
    s.add_argument("--tokens", default="all", choices=["all", "prompt", "decode"])
    s.add_argument("--tol", type=float, default=0.15, help="relative tolerance of the verdict (default 0.15)")
    s.add_argument("--group-size", default="auto", help="average A's statistics over groups of this many "
                   "requests (default auto: B's request count when A has at least twice as many)")
    s.add_argument("--json", metavar="OUT", help="write the comparison as JSON")
    s.set_defaults(func=cmd_trace_compare)

    s = tsub.add_parser("fit", help="fit the synthetic generator to a real trace; writes a profile for synth")
    s.add_argument("trace")
    s.add_argument("-o", "--output", required=True, help="profile YAML")
    s.add_argument("--tokens", default="all", choices=["all", "prompt", "decode"],
                   help="tokens whose statistics the fit matches")
    s.add_argument("--name", help="profile name (default fitted-MODEL)")
    s.add_argument("--rounds", type=int, default=25)
    s.add_argument("--replicas", type=int, help="synthetic replicas of the trace per round (default: ~20k tokens)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_trace_fit)

    s = sub.add_parser("run", help="simulate a scenario and write a results directory")
    s.add_argument("scenario", help="scenario YAML (e.g. scenarios/quickstart.yaml)")
    s.add_argument("-o", "--output", help="results directory (default runs/NAME-TIMESTAMP)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set policy.capacity=0.4 (repeatable)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("capacity", help="largest batch and longest prompt that fit under the scenario's policy")
    s.add_argument("scenario")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--seq-len", type=int, default=512, help="tokens per request for the batch figure")
    s.add_argument("--compare", action="append", metavar="POLICY",
                   help="also show this policy (YAML, e.g. resident); the last one is the ratio baseline")
    s.add_argument("--json", metavar="OUT")
    s.set_defaults(func=cmd_capacity)

    s = sub.add_parser("sweep", help="run a grid of scenarios in parallel (resumable), one table out")
    s.add_argument("sweep", help="sweep YAML (base scenario + grid)")
    s.add_argument("-j", "--jobs", type=int, default=1, help="local worker processes")
    s.add_argument("--dask", metavar="ADDRESS", help="run on a Dask cluster: tcp://host:port, or 'local'")
    s.add_argument("-o", "--output", help="sweep directory (default: the file's `output`, or runs/sweep-NAME)")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("plot", help="standard figures from sweep tables or results directories")
    s.add_argument("inputs", nargs="+", help="sweep directories (table.csv) and/or results directories")
    s.add_argument("--kind", default="auto", choices=["auto", "memory", "quality", "rate", "interval", "pareto"])
    s.add_argument("-o", "--output", default="plots", help="directory for PNG and SVG files")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("choose", help="the SLO- and quality-feasible Pareto set of a sweep; write the chosen scenario")
    s.add_argument("sweep_dir", help="a sweep directory (table.csv, points/)")
    s.add_argument("--slo-attainment", type=float, default=0.0, metavar="SHARE",
                   help="least SLO attainment, e.g. 0.95")
    s.add_argument("--min-quality", type=float, default=0.0, metavar="SHARE",
                   help="least estimated quality, e.g. 0.95")
    s.add_argument("--max-memory-gb", type=float, help="most peak GPU memory")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--minimise", choices=["memory", "latency", "p99"], help="objective (default: memory)")
    g.add_argument("--maximise", choices=["throughput", "quality"], help="objective")
    s.add_argument("-o", "--output", metavar="CHOSEN.yaml", help="write the chosen point's resolved scenario")
    s.add_argument("--force", action="store_true", help="overwrite -o if it exists")
    s.add_argument("--plot", metavar="DIR", help="write the Pareto plot with the feasible set marked")
    s.set_defaults(func=cmd_choose)

    s = sub.add_parser("replay", help="run a scenario on real hardware (PyTorch) with the same policy objects")
    s.add_argument("scenario", help="scenario YAML, a sweep point directory, or the file `emoe choose -o` wrote")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--scale", type=int, default=1, help="divide hidden sizes by this (CPU runs of big models)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on cuda, float32 on cpu")
    s.add_argument("--weights", metavar="DIR",
                   help="a Hugging Face checkpoint (Mixtral layout) of the scenario's model: real weights, the "
                        "trace's prompt text as tokens, the model's own router and greedy generation")
    s.add_argument("-o", "--output")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("capture", help="record routing traces from a Hugging Face MoE checkpoint")
    s.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    s.add_argument("--prompts", required=True, help="JSONL of {task, prompt}")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="cpu")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_capture)

    s = sub.add_parser("prompts", help="build a prompt set per task from the corpora's held-out part")
    s.add_argument("--data", default="../shared/data/corpora")
    s.add_argument("--tasks", help="comma-separated (default: all)")
    s.add_argument("--per-task", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_prompts)

    s = sub.add_parser("accuracy", help="quality per task with a policy's experts only (real model)")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True, help="JSONL of {task, prompt, reference} (`emoe prompts`)")
    s.add_argument("--policy", default="emoe", choices=["emoe", "frequency", "random", "all"])
    s.add_argument("--capacity", default="0.5", help="share(s) of experts kept, e.g. 0.25,0.5,0.75")
    s.add_argument("--interval", default="1", help="predictor interval(s) p, e.g. 1,10,40")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", metavar="OUT")
    s.set_defaults(func=cmd_accuracy)

    s = sub.add_parser("calibrate-quality", help="fit the fidelity -> quality estimate from `emoe accuracy --json`")
    s.add_argument("accuracy_json")
    s.add_argument("--model-name", required=True, help="the model the measurements come from")
    s.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write it (never inside the package); runs use it when a scenario names it as "
                        "quality.calibration or EMOE_QUALITY_CALIBRATION does")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("sensitivity", help="per-task, per-layer sensitivity to routing errors (real model)")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("--threshold", type=float, default=0.85, help="agreement a layer must keep to be insensitive")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_sensitivity)

    s = sub.add_parser("profile", help="measure copy bandwidth and layer costs; write a hardware profile")
    s.add_argument("--device", default="cpu")
    s.add_argument("--scenario", help="measure layer costs for this scenario's model (and calibrate the step)")
    s.add_argument("--scale", type=int, default=1, help="as for `emoe replay`")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--max-copy-mb", type=int, default=64, help="largest copy size measured (MiB)")
    s.add_argument("--threads", type=int, help="torch threads (default: torch's); the replay uses the same")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("compare", help="simulated vs replayed metrics side by side, with relative errors and a "
                       "verdict")
    s.add_argument("sim", help="results directory of `emoe run`")
    s.add_argument("replay", help="results directory of `emoe replay`")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--tolerance", metavar="NAME=SHARE,...", help="relative tolerances of the verdict (default "
                   "latency=0.05,throughput=0.05,memory=0.02,ttft=0.15; a bare number sets all)")
    s.add_argument("--allow-mismatch", action="store_true", help="compare even when the two sides ran different "
                   "models (shape, dtype, scale) or devices")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("confirm", help="profile, replay, simulate the replay's exact model and compare: a pass/fail "
                       f"verdict per metric (exit {CONFIRM_FAILED} when a tolerance is exceeded)")
    s.add_argument("scenario", help="scenario YAML, a sweep point directory, or the file `emoe choose -o` wrote")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--scale", type=int, default=1, help="divide hidden sizes by this (CPU runs of big models)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on cuda, float32 on cpu")
    s.add_argument("--profile", metavar="PROFILE.yaml", help="reuse this profile (it must be for the replayed "
                   "model on this kind of device) instead of profiling")
    s.add_argument("--tolerance", metavar="NAME=SHARE,...", help="relative tolerances (default "
                   "latency=0.05,throughput=0.05,memory=0.02,ttft=0.15; a bare number sets all)")
    s.add_argument("--threads", type=int, help="torch threads for the profile and the CPU replay (default: torch's)")
    s.add_argument("--max-copy-mb", type=int, default=64, help="largest copy size profiled (MiB)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("-o", "--output", help="directory for everything (default runs/NAME-confirm-TIMESTAMP)")
    s.set_defaults(func=cmd_confirm)

    pr = sub.add_parser("predictor", help="train and evaluate expert predictors")
    psub = pr.add_subparsers(dest="predictor_command", metavar="ACTION")
    psub.required = True
    s = psub.add_parser("train", help="fit a predictor on a trace's training requests")
    s.add_argument("trace")
    s.add_argument("--kind", default="emoe_a", help="frequency | emoe_a | emoe_l | mlp")
    s.add_argument("--holdout", type=float, default=0.2, help="share of requests held out for evaluation")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_predictor_train)
    s = psub.add_parser("eval", help="precision/recall/F1 per layer on requests the predictor never saw")
    s.add_argument("predictor")
    s.add_argument("trace")
    s.add_argument("--top", type=int, help="experts predicted per layer (default: half)")
    s.add_argument("--json", metavar="OUT")
    s.set_defaults(func=cmd_predictor_eval)

    s = sub.add_parser("models", help="list model presets and their derived sizes")
    s.set_defaults(func=cmd_models)
    return p


def _given_path(e: OSError, argv) -> bool:
    """The OS refused a path the user gave (or one inside or above it): the user's to fix.
    An OSError on any other path is the program's and keeps its traceback."""
    if not isinstance(e.filename, str):
        return False
    failed = Path(e.filename).absolute()
    if failed == Path.cwd() or failed == Path(failed.anchor):   # what every relative path is under
        return False
    for arg in argv:
        value = arg.partition("=")[2] if arg.startswith("-") else arg
        if not value:
            continue
        given = Path(value).absolute()
        if failed == given or given in failed.parents or failed in given.parents:
            return True
    return False


def main(argv=None) -> int:
    import os
    os.environ.setdefault("MPLBACKEND", "Agg")   # figures go to files; never open a window
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser.parse_args(argv)
    try:
        code = a.func(a)   # a handler may return its own exit status (confirm: 4 when a check fails)
    except UserError as e:   # only this; any other exception is a bug and keeps its traceback
        print(f"emoe: error: {message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if not _given_path(e, argv):
            raise
        print(f"emoe: error: {e.filename}: {e.strerror} (a path given on the command line); "
              "choose another", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoe: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
