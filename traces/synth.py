"""Synthetic routing traces that look like real MoE routing.

The routing of token t at MoE layer l is a Gumbel-top-k draw (sampling k experts
without replacement) from logits

    B[task, l] + D[request, l] + cross_layer * A[l, top1 at layer l-1]

- B: the task's log-popularity per layer (calibrated so the marginal top-k
  shares match routing-stats where a real model was measured, elsewhere a
  per-layer skew plus a task-specific offset: popularity skew + specialisation);
- D: a per-request offset (how far one prompt strays from its task: sets the
  inter-prompt correlation);
- A: a fixed expert-to-expert affinity between consecutive layers (cross-layer);
- then, with probability temporal_copy, a token keeps the previous token's
  experts at that layer (temporal reuse).

B and A are the "model": they depend on the model, the profile and
structure_seed, never on the request seed, so two traces of one model share
their routing structure the way two runs of a real model do.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np

from sim.models import ModelSpec, get_model
from traces.format import Trace, expert_dtype
from traces.realdata import TASKS, LengthDist, measured_popularity


@dataclass(frozen=True)
class RoutingProfile:
    name: str
    layer_skew: float           # sd of per-layer log-popularity (layers without measured data)
    task_specialisation: float  # sd of a task's log-popularity offset per layer
    request_deviation: float    # sd of a request's log-popularity offset per layer
    temporal_copy: float        # probability a token keeps the previous token's experts
    cross_layer: float          # strength of the layer l-1 -> l affinity
    gate_temperature: float = 1.0
    recurrence: float = 0.0     # AR(1) coefficient of request deviations along a task's request order


# `real`: tuned (see tests/test_synth_calibration.py) so Mixtral-shape traces measure
# inside REAL_DECODE_TRACE (traces/realdata.py); there, a request strays from its
# task independently of the one before. `paper`: reaches PAPER.md's recurrence -
# consecutive prompts 0.75-0.95, a prompt and its 20th successor ~0.5 - through
# request deviations that drift slowly along a task's requests.
PROFILES = {
    "real": RoutingProfile("real", layer_skew=0.40, task_specialisation=0.30, request_deviation=0.70,
                           temporal_copy=0.04, cross_layer=2.0),
    "paper": RoutingProfile("paper", layer_skew=1.0, task_specialisation=0.6, request_deviation=1.6,
                            temporal_copy=0.04, cross_layer=4.0, recurrence=0.85),
}


def _rng(*keys) -> np.random.Generator:
    """A generator seeded by names, stable across runs and machines."""
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


class RoutingModel:
    """The fixed routing structure of one model under one profile."""

    def __init__(self, model: ModelSpec, tasks: list[str], profile: RoutingProfile,
                 structure_seed: int = 0, calibrate: bool = True):
        self.model, self.tasks, self.profile = model, list(tasks), profile
        L, E = model.n_moe_layers, model.n_experts
        rng = _rng(model.name, profile.name, structure_seed, "layers")
        layer_base = profile.layer_skew * rng.standard_normal((L, E))
        self.affinity = rng.standard_normal((L, E, E))
        self.target = np.empty((len(tasks), L, E))
        for i, task in enumerate(tasks):
            spec = _rng(model.name, profile.name, structure_seed, "task", task).standard_normal((L, E))
            logits = layer_base + profile.task_specialisation * spec
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            # Expected top-k share: a draw without replacement flattens softmax(logits);
            # calibration below aims the marginal shares at p (or at the measured ones).
            domain = TASKS[task].domain if task in TASKS else "c4"
            for layer, share in measured_popularity(model.name, domain).items():
                if layer < L:
                    p[layer] = share
            self.target[i] = p
        self.base = np.log(self.target)
        if calibrate:
            self._calibrate(structure_seed)

    def _calibrate(self, seed: int, iters: int = 5, tokens_per_task: int = 8000):
        """Fit B so each task's marginal top-k share per layer matches its target.

        Layer l's draw depends on layer l-1's choices (affinity), so layers are
        fitted in order, each a few fixed-point steps B += log(target / share)."""
        rng = _rng(self.model.name, self.profile.name, seed, "calibrate")
        n_req = tokens_per_task // 10   # many short requests average out request deviations
        req = np.repeat(np.arange(n_req * len(self.tasks)), 10)
        task = req // n_req
        dev = self.profile.request_deviation * rng.standard_normal(
            (n_req * len(self.tasks), self.model.n_moe_layers, self.model.n_experts))
        self._route(task, req, dev, rng, copy_prob=0.0, calibrate_iters=iters)

    def _route(self, task_of_tok, req_of_tok, deviation, rng, copy_prob, first_of_req=None,
               want_probs=False, calibrate_iters=0):
        """Route T tokens through all layers; returns experts, gates (T, L, k) and probs."""
        T = len(task_of_tok)
        L, E, k = self.model.n_moe_layers, self.model.n_experts, self.model.top_k
        experts = np.empty((T, L, k), dtype=expert_dtype(E))
        gates = np.empty((T, L, k), dtype=np.float16)
        probs = np.empty((T, L, E), dtype=np.float16) if want_probs else None
        prev_top1 = None
        ar = np.arange(T)
        n_tasks = len(self.tasks)
        for layer in range(L):
            fixed = deviation[req_of_tok, layer]
            if prev_top1 is not None:
                fixed = fixed + self.profile.cross_layer * self.affinity[layer, prev_top1]
            for _ in range(calibrate_iters):
                z = self.base[task_of_tok, layer] + fixed + rng.gumbel(size=(T, E))
                top = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < E else np.tile(np.arange(E), (T, 1))
                share = np.bincount((task_of_tok[:, None] * E + top).ravel(), minlength=n_tasks * E)
                share = share.reshape(n_tasks, E) / np.maximum(np.bincount(task_of_tok, minlength=n_tasks), 1)[:, None] / k
                self.base[:, layer] += np.log(self.target[:, layer]) - np.log(np.maximum(share, 1e-5))
            logits = self.base[task_of_tok, layer] + fixed + rng.gumbel(size=(T, E))
            if copy_prob > 0:
                # Forward fill: a copying token takes the routing of the last
                # non-copying token before it; request starts never copy.
                copy = rng.random(T) < copy_prob
                copy[first_of_req] = False
                src = np.maximum.accumulate(np.where(copy, 0, ar))
                logits = logits[src]
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < E else np.tile(np.arange(E), (T, 1))
            top_logits = np.take_along_axis(logits, top, axis=1)
            order = np.argsort(-top_logits, axis=1)
            top = np.take_along_axis(top, order, axis=1)
            top_logits = np.take_along_axis(top_logits, order, axis=1) / self.profile.gate_temperature
            g = np.exp(top_logits - top_logits[:, :1])
            gates[:, layer] = g / g.sum(axis=1, keepdims=True)
            experts[:, layer] = top
            if want_probs:
                z = logits / self.profile.gate_temperature
                pz = np.exp(z - z.max(axis=1, keepdims=True))
                probs[:, layer] = pz / pz.sum(axis=1, keepdims=True)
            prev_top1 = top[:, 0]
        return experts, gates, probs


def _deviations(prof: RoutingProfile, tasks: np.ndarray, last: dict, rng, L: int, E: int) -> np.ndarray:
    """Per-request log-popularity offsets; with recurrence rho, consecutive requests of a
    task share them: D_r = rho * D_prev + sqrt(1 - rho^2) * noise (same variance)."""
    noise = prof.request_deviation * rng.standard_normal((len(tasks), L, E))
    rho = prof.recurrence
    if rho <= 0:
        return noise
    keep = np.sqrt(1 - rho * rho)
    for i, t in enumerate(tasks.tolist()):
        if t in last:
            noise[i] = rho * last[t] + keep * noise[i]
        last[t] = noise[i]
    return noise


def sample_lengths(task: str, n: int, rng: np.random.Generator, prompt_mean=None, output_mean=None):
    """Prompt and output token counts for n requests of a task (means overridable)."""
    prof = TASKS[task]
    if prompt_mean:
        prof = replace(prof, prompt=LengthDist(prompt_mean, prof.prompt.sd_log, 1, max(prof.prompt.hi, 8 * prompt_mean)))
    if output_mean:
        prof = replace(prof, output=LengthDist(output_mean, prof.output.sd_log, 1, max(prof.output.hi, 4 * output_mean)))

    def draw(d):
        mu = np.log(d.mean) - d.sd_log ** 2 / 2   # lognormal with the stated mean
        return np.clip(np.rint(rng.lognormal(mu, d.sd_log, n)), d.lo, d.hi).astype(np.int32)
    return draw(prof.prompt), draw(prof.output)


def synthesize(model, tasks, n_requests: int, seed: int = 0, profile: str | RoutingProfile = "real",
               task_weights=None, rate: float | None = None, router_probs: bool = False,
               structure_seed: int = 0, prompt_mean: float | None = None, output_mean: float | None = None,
               chunk_tokens: int = 400_000, progress=None, **overrides) -> Trace:
    """Generate a trace. `overrides` replace single profile knobs (e.g. request_deviation=0.3)."""
    model = get_model(model)
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    if n_requests < 1:
        raise ValueError("n_requests must be at least 1")
    if isinstance(profile, str) and profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; choose one of {list(PROFILES)}")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if overrides:
        prof = replace(prof, name=prof.name + "+custom", **overrides)
    rm = RoutingModel(model, tasks, prof, structure_seed)

    rng = np.random.default_rng(seed)
    w = np.ones(len(tasks)) if task_weights is None else np.asarray(task_weights, float)
    task_idx = rng.choice(len(tasks), size=n_requests, p=w / w.sum())
    prompt = np.empty(n_requests, np.int32)
    output = np.empty(n_requests, np.int32)
    for i, t in enumerate(tasks):
        sel = task_idx == i
        prompt[sel], output[sel] = sample_lengths(t, int(sel.sum()), rng, prompt_mean, output_mean)
    lengths = prompt.astype(np.int64) + output
    T = int(lengths.sum())
    L, E, k = model.n_moe_layers, model.n_experts, model.top_k
    experts = np.empty((T, L, k), dtype=expert_dtype(E))
    gates = np.empty((T, L, k), dtype=np.float16)
    probs = np.empty((T, L, E), dtype=np.float16) if router_probs else None

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    last_dev: dict[int, np.ndarray] = {}   # per task: the previous request's deviation (recurrence)
    r0 = 0
    while r0 < n_requests:   # chunks of whole requests bound memory
        r1 = int(np.searchsorted(offsets, offsets[r0] + chunk_tokens, side="right")) - 1
        r1 = max(r1, r0 + 1)
        n_tok = int(offsets[r1] - offsets[r0])
        req_of_tok = np.repeat(np.arange(r1 - r0), lengths[r0:r1])
        first = (offsets[r0:r1] - offsets[r0]).astype(np.int64)
        dev = _deviations(prof, task_idx[r0:r1], last_dev, rng, L, E)
        e, g, p = rm._route(task_idx[r0:r1][req_of_tok], req_of_tok, dev, rng, prof.temporal_copy,
                            first_of_req=first, want_probs=router_probs)
        sl = slice(int(offsets[r0]), int(offsets[r0]) + n_tok)
        experts[sl], gates[sl] = e, g
        if router_probs:
            probs[sl] = p
        if progress:
            progress(r1 - r0)
        r0 = r1

    arrival = None
    if rate:
        arrival = np.cumsum(rng.exponential(1.0 / rate, n_requests))
    extra = dict(generator="emoe trace synth", profile=asdict(prof), seed=seed, structure_seed=structure_seed,
                 tasks=tasks, rate=rate)
    return Trace(model.name, L, E, k, np.array([f"r{i:06d}" for i in range(n_requests)]),
                 np.array(tasks)[task_idx], prompt, output, experts, gates, arrival, None, probs,
                 model.n_shared_experts, extra)
