"""Commands on a real Hugging Face MoE checkpoint: `emoe capture` (routing traces), `emoe prompts`
(prompt sets), `emoe accuracy` and `emoe sensitivity` (quality with restricted experts), and
`emoe calibrate-quality` (the fidelity -> quality estimate runs use)."""
from __future__ import annotations

import time
from pathlib import Path

from sim.cli.common import Registry, add_force, count, needs, output_file, positive_whole, share, write_text
from traces.errors import UserError, message


def add_parsers(sub):
    for add in (add_capture, add_prompts, add_accuracy, add_calibrate, add_sensitivity):
        add(sub)


def hf_model(path):
    d = Path(path)
    if not (d / "config.json").exists():
        raise UserError(f"--model: '{d}' is not a Hugging Face checkpoint directory (no config.json)")
    with needs("a real model", "capture"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


def prompt_file(path) -> list[dict]:
    """A prompts JSONL file; read_prompts only parses, so what it refuses is the file's fault."""
    from traces.capture import read_prompts
    try:
        return read_prompts(path)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts: {message(e)}; build prompt sets with `emoe prompts`") from None


def example_file(path):
    rows = prompt_file(path)
    missing = [i for i, r in enumerate(rows) if "reference" not in r]
    if missing:
        raise UserError(f"{path}: line {missing[0] + 1} has no 'reference' continuation; build prompt sets "
                        "with `emoe prompts`")
    return rows


def numbers(text, name, cast=float):
    try:
        return [cast(x) for x in str(text).split(",")]
    except ValueError:
        raise UserError(f"--{name}: expected comma-separated numbers, got '{text}'") from None


def add_capture(sub):
    s = sub.add_parser("capture", help="record routing traces from a Hugging Face MoE checkpoint")
    s.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    s.add_argument("--prompts", required=True, help="JSONL of {task, prompt}")
    s.add_argument("--max-new-tokens", type=positive_whole, default=32)
    s.add_argument("--batch-size", type=positive_whole, default=8)
    s.add_argument("--device", default="cpu")
    s.add_argument("-o", "--output", required=True)
    add_force(s)
    s.set_defaults(func=capture)


def capture(a):
    with needs("capture", "capture"):
        from traces.capture import capture_dir
    from traces.format import save_trace, trace_path
    output_file(trace_path(a.output), "-o", a.force)
    if not (Path(a.model) / "config.json").exists():
        raise UserError(f"--model {a.model}: not a Hugging Face checkpoint directory (no config.json)")
    prompt_file(a.prompts)   # its mistakes before the model loads
    t0 = time.time()
    tr = capture_dir(a.model, a.prompts, a.max_new_tokens, a.device, a.batch_size)
    path = save_trace(tr, a.output)
    print(f"wrote {path}: {tr.n_requests} prompts, {tr.n_tokens} tokens, {tr.n_layers} MoE layers x "
          f"{tr.n_experts} experts, top-{tr.top_k} ({time.time() - t0:.1f}s)")


def add_prompts(sub):
    s = sub.add_parser("prompts", help="build a prompt set per task from the corpora's held-out part")
    s.add_argument("--data", default="../shared/data/corpora")
    s.add_argument("--tasks", help="comma-separated (default: all)")
    s.add_argument("--per-task", type=positive_whole, default=20)
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("-o", "--output", required=True)
    add_force(s)
    s.set_defaults(func=prompts)


def prompts(a):
    from traces.prompts import TASKS, heldout_prompts, write_prompts
    output_file(a.output, "-o", a.force)
    tasks = a.tasks.split(",") if a.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if not Path(a.data).is_dir():
        raise UserError(f"--data {a.data}: no such directory; give the corpora directory (../shared/data/corpora)")
    rows = heldout_prompts(a.data, a.per_task, tasks, a.seed)
    print(f"wrote {write_prompts(rows, a.output)}: {len(rows)} prompts ({', '.join(tasks)})")


def add_accuracy(sub):
    s = sub.add_parser("accuracy", help="quality per task with a policy's experts only (real model)")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True, help="JSONL of {task, prompt, reference} (`emoe prompts`)")
    s.add_argument("--policy", default="emoe", choices=Registry("replay.options", "KEEP_RULES"), metavar="RULE",
                   help="experts kept: %(choices)s (default emoe)")
    s.add_argument("--capacity", default="0.5", help="share(s) of experts kept, e.g. 0.25,0.5,0.75")
    s.add_argument("--interval", default="1", help="predictor interval(s) p, e.g. 1,10,40")
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("--json", metavar="OUT")
    add_force(s)
    s.set_defaults(func=measure_accuracy)


def measure_accuracy(a):
    from replay.quality import accuracy
    if a.json:
        output_file(a.json, "--json", a.force)
    model, tok = hf_model(a.model)
    examples = example_file(a.prompts)
    rows = []
    for cap in numbers(a.capacity, "capacity"):
        for p in numbers(a.interval, "interval", int):
            res = accuracy(model, tok, examples, a.policy, cap, p, a.seed)
            for task, r in res.items():
                rows.append(dict(policy=a.policy, capacity=cap, interval=p, task=task, **r))
    import pandas as pd
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if a.json:
        print(f"wrote {write_text(a.json, df.to_json(orient='records', indent=2), '--json')}")


def add_calibrate(sub):
    s = sub.add_parser("calibrate-quality", help="fit the fidelity -> quality estimate from `emoe accuracy --json`")
    s.add_argument("accuracy_json")
    s.add_argument("--model-name", required=True, help="the model the measurements come from")
    s.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write it (never inside the package); runs use it when a scenario names it as "
                        "quality.calibration or EMOE_QUALITY_CALIBRATION does")
    add_force(s)
    s.set_defaults(func=calibrate)


def calibrate(a):
    from sim import quality
    output_file(quality.check_path(a.output), "-o", a.force)   # never into the package, even with --force
    calib = quality.from_accuracy_json(a.accuracy_json, a.model_name)
    path = quality.write(calib, a.output)
    print(f"wrote {path}: {len(calib['curves']) - 1} tasks from {a.accuracy_json}; use it with "
          f"`quality: {{calibration: {path}}}` in a scenario, or {quality.ENV}={path}")


def add_sensitivity(sub):
    s = sub.add_parser("sensitivity", help="per-task, per-layer sensitivity to routing errors (real model)")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("--threshold", type=share, default=0.85, help="agreement a layer must keep to be insensitive")
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("-o", "--output", required=True)
    add_force(s)
    s.set_defaults(func=measure_sensitivity)


def measure_sensitivity(a):
    import yaml

    from replay.quality import sensitivity
    output_file(a.output, "-o", a.force)
    model, tok = hf_model(a.model)
    res = sensitivity(model, tok, example_file(a.prompts), a.threshold, a.seed)
    table = {"model": Path(a.model).name, "threshold": a.threshold, "default": 1.0,
             "tasks": res["tasks"], "measured": {t: [round(x, 4) for x in c] for t, c in res["curves"].items()}}
    write_text(a.output, yaml.safe_dump(table, sort_keys=False), "-o")
    for task, curve in res["curves"].items():
        print(f"{task:15s} agreement with layers 0..m-1 randomised: " + " ".join(f"{x:.2f}" for x in curve)
              + f"   s = {res['tasks'][task]}")
    print(f"wrote {a.output} (use it as policy.sensitivity)")
