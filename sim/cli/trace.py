"""`emoe trace synth|import|info|stats|compare|fit|convert`: make, import, inspect, measure and convert routing
traces."""
from __future__ import annotations

import json
import time
from pathlib import Path

from sim.cli.common import (Registry, add_force, count, output_dir, output_file, positive, positive_whole, preset,
                            progress, write_text)
from traces.errors import UserError, message

TOKEN_SETS = Registry("traces.stats", "TOKEN_SETS")


def add_parsers(sub):
    tr = sub.add_parser("trace", help="make, import, inspect and measure routing traces")
    tsub = tr.add_subparsers(dest="trace_command", metavar="ACTION")
    tsub.required = True
    for add in (add_synth, add_import, add_info, add_stats, add_compare, add_fit, add_convert):
        add(tsub)


def add_synth(sub):
    s = sub.add_parser("synth", help="generate a synthetic trace calibrated to real routing")
    s.add_argument("--model", help="model preset (see `emoe models`); a fitted profile names its own")
    s.add_argument("--tasks", help="comma-separated tasks, optionally weighted: qa:2,code:1 (default: "
                   "qa,summarization,code,math,conversation, or a fitted profile's tasks and shares)")
    s.add_argument("--requests", type=positive_whole, default=200)
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("--profile", default="real", help="routing profile: real (fitted to real Mixtral routing), "
                   "paper (the paper's recurrence), or a PROFILE.yaml from `emoe trace fit`")
    s.add_argument("--like", metavar="TRACE", help="copy each request's task and lengths (and arrivals) from "
                   "this trace: synthetic routing at exactly its shape")
    s.add_argument("--rate", type=positive, help="write Poisson arrival times at this rate (req/s)")
    s.add_argument("--prompt-len", type=positive, help="override every task's mean prompt tokens")
    s.add_argument("--output-len", type=positive, help="override every task's mean output tokens")
    s.add_argument("--router-probs", action="store_true", help="also store full router probabilities")
    s.add_argument("--knob", action="append", metavar="NAME=VALUE",
                   help="override one routing-profile knob, e.g. request_deviation=0.3")
    s.add_argument("--compress", action="store_true", help="deflate the file: version 1, smaller, but read into memory "
                   "instead of mapped")
    s.add_argument("-o", "--output", required=True)
    add_force(s)
    s.set_defaults(func=synth)


def parse_tasks(spec: str):
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


def synth(a):
    from traces.format import load_trace, save_trace, trace_path
    from traces.profile import PROFILES
    from traces.synth import MIXED_TASKS, synthesize
    output_file(trace_path(a.output), "-o", a.force)
    tasks, weights = parse_tasks(a.tasks) if a.tasks else (None, None)
    like = load_trace(a.like, validate_routing=False) if a.like else None
    t0 = time.time()
    bar = progress(like.n_requests if like is not None else a.requests, "synth")
    overrides = {}
    for kv in a.knob or []:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = float(v)
        except ValueError:
            raise UserError(f"--knob {kv}: expected NAME=NUMBER") from None
    try:
        if tasks is None and a.like is None and a.profile in PROFILES:   # a built-in profile lists no tasks
            tasks = list(MIXED_TASKS)
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


def add_import(sub):
    s = sub.add_parser("import", help="convert routing dumps (profiler rows, vLLM, Megatron) to a trace")
    s.add_argument("file")
    s.add_argument("--model", required=True)
    s.add_argument("--format", default="auto", choices=Registry("traces.importer", "FORMATS", first=["auto"]),
                   metavar="FORMAT", help="%(choices)s; rows: per-(request, layer, token) profiler JSONL; "
                   "vllm: --enable-return-routed-experts responses or outputs; megatron: --moe-routing-trace-path "
                   "records (default: detected)")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed (dropped or renumbered rows, "
                   "constant positions, repeated ids, missing routes) and report every repair")
    s.add_argument("--task", help="task label for records that carry none (vllm, megatron)")
    s.add_argument("--compress", action="store_true")
    s.add_argument("-o", "--output", required=True)
    add_force(s)
    s.set_defaults(func=import_)


def import_(a):
    from traces.format import save_trace, trace_path
    from traces.importer import import_trace
    output_file(trace_path(a.output), "-o", a.force)
    tr, report = import_trace(a.file, preset(a.model), a.format, repair=a.repair, task=a.task)
    path = save_trace(tr, a.output, compress=a.compress)
    print("\n".join(report.lines()))
    print(f"wrote {path}: {tr.n_requests} requests, {tr.n_tokens} tokens")


def add_info(sub):
    s = sub.add_parser("info", help="summarise a trace (shape, requests, lengths per task)")
    s.add_argument("trace")
    s.set_defaults(func=info)


def info(a):
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


def add_stats(sub):
    s = sub.add_parser("stats", help="routing statistics per task and overall")
    s.add_argument("trace")
    s.add_argument("--tokens", default="all", choices=TOKEN_SETS, metavar="TOKENS", help="%(choices)s (default all)")
    s.add_argument("--json", metavar="OUT", help="write all statistics as JSON")
    s.add_argument("--plot", metavar="DIR", help="write heatmaps (PNG and SVG)")
    add_force(s)
    s.set_defaults(func=stats)


def stats(a):
    from traces.format import load_trace
    from traces.stats import trace_stats
    if a.json:
        output_file(a.json, "--json", a.force)
    if a.plot:
        output_dir(a.plot, "--plot", a.force)
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
        print(f"wrote {write_text(a.json, json.dumps(s, indent=2, default=float), '--json')}")
    if a.plot:
        from traces.plots import plot_trace
        for p in plot_trace(tr, a.plot, a.tokens):
            print(f"wrote {p}")


def add_compare(sub):
    s = sub.add_parser("compare", help="two traces' routing statistics side by side, each with a verdict")
    s.add_argument("a", help="trace (.npz) or statistics JSON")
    s.add_argument("b", help="trace (.npz), statistics JSON, or reference:mixtral-8x7b-instruct (real figures)")
    s.add_argument("--tokens", default="all", choices=TOKEN_SETS, metavar="TOKENS", help="%(choices)s (default all)")
    s.add_argument("--tol", type=positive, default=0.15, help="relative tolerance of the verdict (default 0.15)")
    s.add_argument("--group-size", default="auto", help="average A's statistics over groups of this many "
                   "requests (default auto: B's request count when A has at least twice as many)")
    s.add_argument("--json", metavar="OUT", help="write the comparison as JSON")
    add_force(s)
    s.set_defaults(func=compare)


def compare(a):
    from traces.compare import compare_paths, format_report
    group = "auto" if a.group_size == "auto" else positive_int(a.group_size, "--group-size")
    if a.json:
        output_file(a.json, "--json", a.force)
    rep = compare_paths(a.a, a.b, a.tokens, a.tol, group)
    print(format_report(rep))
    if a.json:
        print(f"wrote {write_text(a.json, json.dumps(rep, indent=2, default=float), '--json')}")


def positive_int(v: str, option: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{option}: expected a positive whole number or 'auto', got '{v}'")
    return n


def add_fit(sub):
    s = sub.add_parser("fit", help="fit the synthetic generator to a real trace; writes a profile for synth")
    s.add_argument("trace")
    s.add_argument("-o", "--output", required=True, help="profile YAML")
    s.add_argument("--tokens", default="all", choices=TOKEN_SETS, metavar="TOKENS",
                   help="tokens whose statistics the fit matches: %(choices)s (default all)")
    s.add_argument("--name", help="profile name (default fitted-MODEL)")
    s.add_argument("--rounds", type=positive_whole, default=25)
    s.add_argument("--replicas", type=positive_whole,
                   help="synthetic replicas of the trace per round (default: ~20k tokens)")
    s.add_argument("--seed", type=count, default=0)
    add_force(s)
    s.set_defaults(func=fit)


def fit(a):
    from traces.fit import fit_profile
    from traces.format import load_trace
    from traces.profile import profile_path, save_profile
    output_file(profile_path(a.output), "-o", a.force)
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


def add_convert(sub):
    s = sub.add_parser("convert", help="rewrite a trace in another format version or compression, streaming")
    s.add_argument("trace")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--to-version", type=int, choices=(1, 2), help="2: uncompressed, mapped on load (default); "
                   "1: the np.savez layout older emoe reads")
    s.add_argument("--compress", action="store_true", help="deflate (version 1 only: smaller, read into memory)")
    add_force(s)
    s.set_defaults(func=convert)


def convert(a):
    from traces.format import FORMAT_VERSION, convert_trace, trace_path
    version = a.to_version or (1 if a.compress else FORMAT_VERSION)
    if a.compress and version >= 2:
        raise UserError("--compress: version 2 is never compressed (it is mapped, not loaded); "
                        "use --to-version 1 --compress")
    output_file(trace_path(a.output), "-o", a.force)
    r = convert_trace(a.trace, a.output, version, a.compress)
    print(f"wrote {r['path']} (version {r['version_out']}{', compressed' if a.compress else ''}) from {a.trace} "
          f"(version {r['version_in']}): {r['requests']} requests, {r['tokens']} tokens, "
          f"{r['bytes_in'] / 1e6:.1f} MB -> {r['bytes_out'] / 1e6:.1f} MB in {r['seconds']:.1f}s")
