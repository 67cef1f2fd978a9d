"""Fit the synthetic generator to real routing: `emoe trace fit REAL.npz -o PROFILE.yaml`.

What can be read off the real trace directly is: each task's share of requests,
its prompt and output lengths, and its expert popularity per layer for prompt and
for generated tokens; and the gate distribution. The rest - how strongly a token
keeps a path through the layers, how fast its context drifts across tokens, how
far a request strays from its task - is fitted by simulation: the generator
fills the real trace's own shape (its tasks and lengths, a few replicas), the
statistics of traces/stats.py are measured on it exactly as on the real trace,
and each knob moves toward the value that makes its statistic match:

    per layer context strength  <- temporal reuse at that layer (token distance 1)
    context persistence         <- reuse at token distances 4-16 relative to distance 1
    path strength               <- NMI of top-1 experts one layer apart (per layer: the
                                   layer's mean NMI with the layers near it, where measured)
    context layer persistence   <- NMI at the largest layer distance relative to one layer apart
    request deviation           <- per-request Gini of expert counts (per layer: the layer's
                                   reuse floor, how concentrated one request is there)
    (no real trace) layer skew, task specialisation, phase shift
                                <- inter-prompt correlation, JS between tasks, JS prompt vs decode

Each move is multiplicative, damped, and halves its step when it overshoots; the
same random numbers are used every round, so the fit is deterministic. Gates are
fitted last in closed form (gate temperature and power that put the top-1 gate's
quantiles where the real ones are). The shipped `real` profile is this fit with
the real Mixtral figures of traces/realdata.py as targets (`fit_mixtral_real`).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from traces.compare import flatten
from traces.format import Trace
from traces.profile import PROFILES, RoutingProfile, per_layer
from traces.realdata import REAL_MIXTRAL_STRUCTURE, REFERENCE_SHAPE
from traces.stats import NMI_DISTANCES, layer_connectivity, request_counts, summary_stats, token_mask
from traces.synth import RoutingModel, RoutingShape, Template, routing_shape, sample_lengths, synthesize

GATE_TARGET_QUANTILES = (0.5, 0.9)


# ---- what a real trace gives directly ------------------------------------------------
def task_tables(real: Trace) -> dict:
    """Per task: share of requests, lognormal lengths, expert popularity per phase and layer."""
    dec = real.decode_mask()
    cp, cd = request_counts(real, ~dec), request_counts(real, dec)
    out = {}
    for task in real.tasks:
        sel = real.task == task
        tables = dict(weight=float(sel.mean()), prompt=_length_dist(real.prompt_tokens[sel]),
                      output=_length_dist(real.output_tokens[sel]), popularity={})
        both = cp[sel].sum(axis=0) + cd[sel].sum(axis=0)
        for phase, c in (("prompt", cp[sel].sum(axis=0)), ("decode", cd[sel].sum(axis=0))):
            if c.sum() == 0:          # a phase this task never has: route it like the other
                c = both
            c = c.astype(float) + 0.5   # half a count per expert: unseen experts stay possible
            tables["popularity"][phase] = (c / c.sum(axis=1, keepdims=True)).tolist()
        out[task] = tables
    return out


def _length_dist(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=float)
    pos = x[x > 0]
    sd = float(np.std(np.log(pos))) if len(pos) > 1 else 0.0
    return dict(mean=max(float(x.mean()), 1.0), sd_log=max(sd, 0.01), lo=int(x.min()), hi=int(max(x.max(), 1)))


def gate_targets(real: Trace, tokens: str) -> list[tuple[float, float]] | None:
    """Two (quantile, value) points of the real top-1 gate share: the median, and where the
    share crosses 0.9 (the upper quantiles saturate near 1); None when gates were not measured."""
    s = summary_stats(real, tokens)
    q, over = s["gate_quantiles"], s["gate_top1_over_0_9"]
    if any(math.isnan(q[str(p)]) for p in GATE_TARGET_QUANTILES):
        return None
    if 0.01 < over < 0.49:
        return [(0.5, q["0.5"]), (1 - over, 0.9)]
    return [(p, q[str(p)]) for p in GATE_TARGET_QUANTILES]


# ---- the fitted knobs ------------------------------------------------------------------
class _Knob:
    """A positive knob moved multiplicatively toward its target; the step halves on overshoot."""

    def __init__(self, value: float, gain: float, lo: float, hi: float):
        self.value, self.gain, self.lo, self.hi = float(value), gain, lo, hi
        self.last_sign, self.same = 0, 0

    def step(self, target: float, current: float):
        if not (np.isfinite(target) and np.isfinite(current)) or current <= 0 or target <= 0:
            return
        sign = np.sign(target - current)
        if self.last_sign and sign and sign != self.last_sign:
            self.gain, self.same = self.gain / 2, 0
        elif sign and sign == self.last_sign:
            self.same += 1
            if self.same >= 3:                      # creeping the same way: lengthen the step
                self.gain, self.same = self.gain * 1.5, 0
        self.last_sign = sign or self.last_sign
        ratio = float(np.clip(target / current, 1 / 3, 3))
        self.value = float(np.clip(self.value * ratio ** self.gain, self.lo, self.hi))


def _excess(v: float, floor: float) -> float:
    return max(v - floor, 2e-3)


class Fitter:
    """Simulate at the real shape, measure, move the knobs; see the module docstring."""

    def __init__(self, shape, like: Template, group_size: int, targets: dict, base: RoutingProfile, tokens: str,
                 fit_population: bool, seed: int = 0, name: str = "fitted"):
        """`like`: the requests to simulate, replicas of the real shape one after another;
        statistics are measured per `group_size` requests (one replica) and averaged."""
        self.shape, self.like, self.group_size, self.targets, self.tokens = shape, like, group_size, targets, tokens
        self.seed, self.fit_population = seed, fit_population
        L = shape.n_moe_layers
        s2 = per_layer(base.path_strength, L) ** 2
        w = per_layer(base.context_share, L)
        start_ctx = np.where(s2 * w > 0, s2 * w, 2.0)
        start_id = float(np.mean(s2 * (1 - w))) if (s2 * (1 - w)).mean() > 0 else 0.5
        self.ctx = [_Knob(c, 1.0, 1e-3, 100.0) for c in start_ctx]
        # The path's strength: per layer where the real trace gives each layer's connectivity, else one.
        n_id = L if "connectivity" in targets else 1
        self.ident = [_Knob(start_id, 2.0, 1e-3, 50.0) for _ in range(n_id)]
        self.rho = _Knob(base.context_persistence or 0.5, 0.5, 0.01, 0.98)
        self.ctx_drift = _Knob(1 - min(base.context_layer_persistence, 0.99), 1.0, 1e-3, 1.0)
        # How far requests stray: per layer where the real trace gives each layer's reuse floor
        # (how concentrated one request is there), else one for all layers.
        n_dev = L if "reuse_floor_by_layer" in targets else 1
        self.dev = [_Knob(max(float(np.mean(base.request_deviation)), 0.05), 3.0, 0.01, 5.0) for _ in range(n_dev)]
        self.skew = _Knob(max(base.layer_skew, 0.05), 2.0, 0.01, 3.0)
        self.spec = _Knob(max(base.task_specialisation, 0.02), 1.0, 0.0, 3.0)
        self.phase = _Knob(max(base.phase_shift, 0.05), 1.0, 0.0, 3.0)
        self.base_profile = replace(base, name=name, temporal_copy=0.0, cross_layer=0.0, recurrence=0.0)
        self.rm_base = None
        self.history = []

    def profile(self) -> RoutingProfile:
        ctx = np.array([k.value for k in self.ctx])
        total = ctx + np.array([k.value for k in self.ident])
        p = replace(self.base_profile, path_strength=tuple(np.sqrt(total).round(4)),
                    context_share=tuple((ctx / total).round(4)), context_persistence=round(self.rho.value, 4),
                    context_layer_persistence=round(1 - self.ctx_drift.value, 4),
                    request_deviation=round(self.dev[0].value, 4) if len(self.dev) == 1 else
                    tuple(round(k.value, 4) for k in self.dev))
        if self.fit_population:
            p = replace(p, layer_skew=round(self.skew.value, 4), task_specialisation=round(self.spec.value, 4),
                        phase_shift=round(self.phase.value, 4))
        return p

    def simulate(self, prof: RoutingProfile, gates_raw: bool = False) -> tuple[Trace, dict]:
        tasks = sorted(set(self.like.task.tolist()))
        rm = RoutingModel(self.shape, tasks, prof, structure_seed=0, base=self.rm_base,
                          calibrate_iters=None if self.rm_base is None else 3)
        self.rm_base = rm.base
        if gates_raw:
            prof = replace(prof, gate_temperature=1.0, gate_power=1.0)
            rm.profile = prof
        t = synthesize(self.shape, None, None, seed=self.seed, profile=prof, like=self.like, routing_model=rm)
        return t, measure(t, self.tokens, self.group_size, "connectivity" in self.targets)

    def round(self) -> dict:
        prof = self.profile()
        _, s = self.simulate(prof)
        tg = self.targets
        err = relative_errors(s, tg)
        self.history.append(dict(knobs=prof.knobs(), errors=err))
        floor = np.asarray(s["reuse_floor_by_layer"])
        tfloor = np.asarray(tg.get("reuse_floor_by_layer", floor))
        if "reuse_by_layer" in tg:
            for knob, cur, tgt, f, tf in zip(self.ctx, s["reuse_by_layer"], tg["reuse_by_layer"], floor, tfloor):
                knob.step(_excess(tgt, tf), _excess(cur, f))
        fm, tfm = float(np.mean(floor)), float(np.mean(tfloor))
        if {"reuse_1", "reuse_4_16"} <= tg.keys():
            self.rho.step(_excess(tg["reuse_4_16"], tfm) / _excess(tg["reuse_1"], tfm),
                          _excess(s["reuse_4_16"], fm) / _excess(s["reuse_1"], fm))
        if "nmi_1" in tg:
            if len(self.ident) > 1:
                for knob, tgt, cur in zip(self.ident, tg["connectivity"], s["connectivity"]):
                    knob.step(tgt, cur)
            else:
                self.ident[0].step(tg["nmi_1"], s["nmi_1"])
        far = far_distance(tg, self.shape.n_moe_layers)
        if far:
            # The context's layer drift shrinks when the simulation loses more dependence with
            # layer distance than real routing does.
            self.ctx_drift.step(max(1 - tg[f"nmi_{far}"] / tg["nmi_1"], 1e-3),
                                max(1 - s[f"nmi_{far}"] / s["nmi_1"], 1e-3))
        if len(self.dev) > 1:
            uniform = self.shape.top_k / self.shape.n_experts        # the floor of routing at random
            for knob, cur, tgt in zip(self.dev, floor, tfloor):
                knob.step(_excess(tgt, uniform), _excess(cur, uniform))
        elif "request_gini" in tg:
            self.dev[0].step(tg["request_gini"], s["request_gini"])
        if self.fit_population:
            for knob, key, gain in ((self.skew, "inter_prompt_correlation", 2.0), (self.spec, "specialisation", 1.0),
                                    (self.phase, "prompt_decode_divergence", 1.0)):
                if key in tg:
                    knob.gain = min(knob.gain, gain)
                    knob.step(tg[key], s[key])
        return dict(profile=prof, stats=s, errors=err)

    def fit_gates(self, prof: RoutingProfile, targets: list[tuple[float, float]]) -> RoutingProfile:
        t, _ = self.simulate(prof, gates_raw=True)
        mask = token_mask(t, self.tokens)
        g = t.gates[mask].astype(np.float64).reshape(-1, t.top_k)
        gaps = np.log(g[:, :1] / np.maximum(g, 1e-12))          # softmax at temperature 1: gaps are logit gaps
        temperature, power = solve_gate_map(gaps, targets)
        return replace(prof, gate_temperature=round(temperature, 4), gate_power=round(power, 4))


def far_distance(targets: dict, n_layers: int) -> int | None:
    ds = [d for d in NMI_DISTANCES if d > 1 and d < n_layers and np.isfinite(targets.get(f"nmi_{d}", np.nan))]
    return max(ds) if ds else None


def measure(t: Trace, tokens: str, group_size: int, connectivity: bool = False) -> dict:
    """Flat statistics (plus per-layer reuse and its floor) averaged over replicas of group_size."""
    per = []
    for g0 in range(0, t.n_requests - group_size + 1, group_size):
        sub = t.subset(np.arange(g0, g0 + group_size)) if group_size < t.n_requests else t
        s = summary_stats(sub, tokens)
        flat = flatten(s)
        flat["reuse_by_layer"] = np.asarray(s["reuse_by_layer"])
        flat["reuse_floor_by_layer"] = np.asarray(s["reuse_floor_by_layer"])
        if connectivity:
            far = far_distance(flat, t.n_layers) or 1
            flat["connectivity"] = layer_connectivity(sub, token_mask(sub, tokens), far)
        per.append(flat)
    out = {}
    for k in per[0]:
        vals = np.array([p[k] for p in per], dtype=float)
        out[k] = np.nanmean(vals, axis=0) if np.isfinite(vals).any() else vals[0]
        if out[k].ndim == 0:
            out[k] = float(out[k])
    return out


GATE_KEYS = ("gate_median", "gate_top1_over_0_9")   # fitted after the loop, in closed form


def relative_errors(s: dict, targets: dict) -> dict:
    out = {}
    for k, v in targets.items():
        if isinstance(v, (list, np.ndarray)) or k not in s or k in GATE_KEYS:
            continue
        if np.isfinite(v) and v and np.isfinite(s[k]):
            out[k] = float((s[k] - v) / abs(v))
    return out


def solve_gate_map(gaps: np.ndarray, targets: list[tuple[float, float]]) -> tuple[float, float]:
    """Gate temperature and power so the top-1 share exp(-0)/sum_i exp(-gap_i^power/temperature)
    has the target values at the two target quantiles (bisection, both monotone)."""
    gaps = np.minimum(np.nan_to_num(gaps, posinf=30.0), 30.0)
    (qa, va), (qb, vb) = sorted(targets)

    def share_q(temp, power, q):
        return float(np.quantile(1.0 / np.exp(-gaps ** power / temp).sum(axis=1), q))

    def temp_for(power):
        lo, hi = -8.0, 8.0                         # log temperature; share falls as temperature rises
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if share_q(np.exp(mid), power, qa) > va else (lo, mid)
        return float(np.exp((lo + hi) / 2))

    lo, hi = np.log(0.2), np.log(5.0)              # log power; the upper quantile rises with power
    for _ in range(30):
        mid = (lo + hi) / 2
        p = float(np.exp(mid))
        lo, hi = (lo, mid) if share_q(temp_for(p), p, qb) > vb else (mid, hi)
    power = float(np.exp((lo + hi) / 2))
    return temp_for(power), power


# ---- entry points ----------------------------------------------------------------------
def run_fit(fitter: Fitter, rounds: int, gate_target, progress=None) -> RoutingProfile:
    best = None
    for i in range(rounds):
        res = fitter.round()
        score = float(np.sqrt(np.mean([e * e for e in res["errors"].values()]))) if res["errors"] else 0.0
        if best is None or score < best[0]:
            best = (score, res["profile"], res["errors"], i)
        if progress:
            progress(i, score)
        if score < 0.02:
            break
    score, prof, errors, at = best
    if gate_target:
        prof = fitter.fit_gates(prof, gate_target)
    report = dict(rounds=len(fitter.history), best_round=at, rms_relative_error=round(score, 4),
                  relative_errors={k: round(v, 4) for k, v in errors.items()},
                  gates="fitted" if gate_target else "not measured in the real trace: the base profile's")
    return replace(prof, fit=report)


def fit_profile(real: Trace, name: str | None = None, tokens: str = "all", rounds: int = 25,
                replicas: int | None = None, seed: int = 0, source: str | None = None, progress=None) -> RoutingProfile:
    """A profile fitted to a real trace: its tables, its shape, and knobs matched by simulation."""
    shape = RoutingShape(real.model, real.n_layers, real.n_experts, real.top_k, real.n_shared_experts)
    tables = task_tables(real)
    base = replace(PROFILES["real"], tasks=tables,
                   shape=dict(name=real.model, n_layers=real.n_layers, n_experts=real.n_experts, top_k=real.top_k,
                              n_shared_experts=real.n_shared_experts))
    targets = measure(real, tokens, real.n_requests, connectivity=True)
    replicas = replicas or max(2, int(np.ceil(20_000 / max(real.n_tokens, 1))))
    fitter = Fitter(shape, Template.of(real).repeat(replicas), real.n_requests, targets, base, tokens,
                    fit_population=False, seed=seed, name=name or f"fitted-{real.model}")
    prof = run_fit(fitter, rounds, gate_targets(real, tokens), progress)
    fit = dict(prof.fit, source=source or real.extra.get("source", real.model), tokens=tokens,
               requests=int(real.n_requests), replicas=replicas)
    return replace(prof, fit=fit)


def reference_template(replicas: int, seed: int = 0, shape: dict = REFERENCE_SHAPE) -> Template:
    """`replicas` groups of the reference shape, each with its own lengths."""
    rng = np.random.default_rng(seed)
    tasks = list(shape["tasks"]) * replicas
    prompt = np.empty(len(tasks), np.int32)
    output = np.empty(len(tasks), np.int32)
    for task in set(tasks):
        sel = np.array([t == task for t in tasks])
        prompt[sel], output[sel] = sample_lengths(task, int(sel.sum()), rng, shape.get("prompt_mean"),
                                                  shape.get("output_mean"))
    return Template(np.array(tasks), prompt, output)


def mixtral_reuse_by_layer(n_layers: int = 32, targets: dict = REAL_MIXTRAL_STRUCTURE) -> np.ndarray:
    """Per-layer reuse target from the three measured figures: layer 0, the last L // 8
    layers, and the mean over layers; the layers between take what the mean leaves."""
    last = max(1, n_layers // 8)
    mid = (targets["reuse_1"] * n_layers - targets["reuse_first_layer"] - last * targets["reuse_last_layers"]) \
        / (n_layers - 1 - last)
    out = np.full(n_layers, mid)
    out[0], out[-last:] = targets["reuse_first_layer"], targets["reuse_last_layers"]
    return out


# Where the fit of the shipped `real` profile starts (fixed, so `python -m traces.fit` reproduces it).
MIXTRAL_START = RoutingProfile("real", layer_skew=0.4, task_specialisation=0.1, request_deviation=0.2,
                               temporal_copy=0.0, cross_layer=0.0, path_strength=(0.6, 4.0, 4.0, 4.0, 2.0),
                               context_share=(0.3, 0.97, 0.97, 0.97, 0.9), context_persistence=0.5,
                               context_layer_persistence=0.9, phase_shift=0.3)


def fit_mixtral_real(rounds: int = 40, replicas: int = 30, seed: int = 0, progress=None) -> RoutingProfile:
    """The shipped `real` profile: the generator fitted to REAL_MIXTRAL_STRUCTURE at REFERENCE_SHAPE."""
    model = routing_shape("mixtral-8x7b", MIXTRAL_START)
    targets = dict(REAL_MIXTRAL_STRUCTURE, reuse_by_layer=mixtral_reuse_by_layer(model.n_moe_layers))
    fitter = Fitter(model, reference_template(replicas, seed), len(REFERENCE_SHAPE["tasks"]), targets,
                    MIXTRAL_START, REFERENCE_SHAPE["tokens"], fit_population=True, seed=seed, name="real")
    gate = [(0.5, targets["gate_median"]), (1 - targets["gate_top1_over_0_9"], 0.9)]
    return run_fit(fitter, rounds, gate, progress)


def profile_literal(p: RoutingProfile) -> str:
    """The profile as the Python literal PROFILES holds (how the shipped `real` is written)."""
    k = p.knobs()
    parts = []
    for key, v in k.items():
        if isinstance(v, tuple):
            v = "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"
        elif isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{key}={v}")
    return f'RoutingProfile("{p.name}", ' + ", ".join(parts) + ")"


if __name__ == "__main__":   # python -m traces.fit: refit the shipped `real` profile and print it
    prof = fit_mixtral_real(progress=lambda i, score: print(f"round {i + 1}: rms relative error {score:.3f}",
                                                            flush=True))
    print(prof.fit)
    print(profile_literal(prof))
