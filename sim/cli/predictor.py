"""`emoe predictor train|eval`: fit an expert predictor on a trace, and score it on requests it never saw."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sim.cli.common import Registry, add_force, count, open_share, output_file, positive_whole, write_text
from traces.errors import UserError, message


def add_parsers(sub):
    pr = sub.add_parser("predictor", help="train and evaluate expert predictors")
    psub = pr.add_subparsers(dest="predictor_command", metavar="ACTION")
    psub.required = True
    add_train(psub)
    add_eval(psub)


def add_train(sub):
    s = sub.add_parser("train", help="fit a predictor on a trace's training requests")
    s.add_argument("trace")
    s.add_argument("--kind", default="emoe_a", choices=Registry("sim.predictors", "TRAINABLE"), metavar="KIND",
                   help="%(choices)s (default emoe_a)")
    s.add_argument("--holdout", type=open_share, default=0.2, help="share of requests held out for evaluation")
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("-o", "--output", required=True, help="predictor file (.npz added unless it ends so)")
    add_force(s)
    s.set_defaults(func=train)


def train(a):
    from sim.predictors import make_predictor
    from sim.predictors.evaluate import split_requests
    from traces.format import load_trace
    out = Path(a.output)
    out = output_file(out if out.suffix == ".npz" else out.with_name(out.name + ".npz"), "-o", a.force)   # as np.savez
    tr = load_trace(a.trace)
    try:
        train_idx, eval_idx = split_requests(tr, a.holdout, a.seed)
    except ValueError as e:   # its only errors: a holdout out of range or too large for the trace
        raise UserError(f"--holdout: {message(e)}") from None
    t0 = time.time()
    pred = make_predictor(a.kind).fit(tr, train_idx)
    pred.save(out)
    print(f"trained {a.kind} on {len(train_idx)} requests of {a.trace} in {time.time() - t0:.1f}s "
          f"({len(eval_idx)} held out); wrote {out}")


def predictor_file(path):
    """A predictor file named on the command line: what cannot be read as one is the file's fault."""
    import zipfile

    from sim.predictors import load_predictor
    if not Path(path).is_file():
        raise UserError(f"predictor file '{path}' does not exist; train one with `emoe predictor train TRACE -o FILE`")
    try:
        return load_predictor(path)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a predictor file from `emoe predictor train` ({message(e)})") from None


def add_eval(sub):
    s = sub.add_parser("eval", help="precision/recall/F1 per layer on requests the predictor never saw")
    s.add_argument("predictor")
    s.add_argument("trace")
    s.add_argument("--top", type=positive_whole, help="experts predicted per layer (default: half)")
    s.add_argument("--json", metavar="OUT")
    add_force(s)
    s.set_defaults(func=score)


def score(a):
    from sim.predictors.evaluate import evaluate, summary_by_layer
    from sim.predictors.overlap import seen_requests
    from traces.format import load_trace
    if a.json:
        output_file(a.json, "--json", a.force)
    pred = predictor_file(a.predictor)
    tr = load_trace(a.trace)
    if (tr.n_layers, tr.n_experts) != (pred.L, pred.E):
        raise UserError(f"predictor is for {pred.L} layers x {pred.E} experts, trace has "
                        f"{tr.n_layers} x {tr.n_experts}")
    held = np.setdiff1d(np.arange(tr.n_requests), seen_requests(tr, pred.train_ids, pred.train_digests))
    if not len(held):
        raise UserError("every request of this trace was used to train the predictor; evaluate on another trace")
    if a.top is not None and a.top > tr.n_experts:
        raise UserError(f"--top {a.top}: the trace's model has {tr.n_experts} experts per layer; "
                        "predict at most that many")
    df = evaluate(pred, tr, held, a.top)
    by_layer = summary_by_layer(df)
    print(f"{pred.kind} on {len(held)} held-out requests of {a.trace} (top {a.top or max(tr.n_experts // 2, 1)} "
          f"experts per layer predicted)")
    print(by_layer.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"mean  precision {df.precision.mean():.3f}  recall {df.recall.mean():.3f}  f1 {df.f1.mean():.3f}  "
          f"coverage {df.coverage.mean():.3f}")
    if a.json:
        write_text(a.json, json.dumps(dict(kind=pred.kind, requests=len(held), **{
            k: float(df[k].mean()) for k in ("precision", "recall", "f1", "coverage")},
            per_layer=by_layer.reset_index().to_dict(orient="records")), indent=2), "--json")
