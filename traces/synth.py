"""Synthetic routing traces that look like real MoE routing.

The routing of token t of request r at MoE layer l is a Gumbel-top-k draw
(sampling k experts without replacement) from logits

    B[task, phase, l] + D[r, l] + latent[t, l] + cross_layer * A[l, top1 at layer l-1]

- B: the task's log-popularity per layer, for prompt and generated tokens
  (calibrated so the marginal top-k shares match their targets: routing-stats
  where a real model was measured, a fitted profile's tables, elsewhere a
  per-layer skew plus a task-specific offset; prompt tokens differ by
  `phase_shift`);
- D: a per-request offset (how far one prompt strays from its task: sets the
  inter-prompt correlation and how unevenly one request uses its experts);
- s_l W_l h: the token's latent path. h[t, l] = sqrt(1 - w_l) a[t] + sqrt(w_l) c[t]:
  a is new at every token (what the token is), c drifts across the request's
  tokens as an AR(1) (the context), so reuse decays with token distance; W_l
  drifts slowly across layers, so a token keeps its path through the depth;
- A: a fixed expert-to-expert affinity between consecutive layers (the one-step
  chain of the `paper` profile); with probability temporal_copy a token keeps
  the previous token's experts at that layer (the paper's temporal recurrence).

Gates of the chosen experts are exp(-(gap to the top-1 logit)^gate_power /
gate_temperature), normalised over the top-k.

B, W and A are the "model": they depend on the model, the profile and
structure_seed, never on the request seed, so two traces of one model share
their routing structure the way two runs of a real model do.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from traces.errors import UserError
from traces.format import Trace, expert_dtype
from traces.model_shape import get_model
from traces.profile import RoutingProfile, per_layer, profile_dict, resolve_profile
from traces.realdata import TASKS, LengthDist, measured_popularity

# The task mix `emoe trace synth` generates when no --tasks are given (and the profile lists none).
MIXED_TASKS = ("qa", "summarization", "code", "math", "conversation")


@dataclass(frozen=True)
class RoutingShape:
    """The part of a model the generator needs (a fitted profile carries it)."""
    name: str
    n_moe_layers: int
    n_experts: int
    top_k: int
    n_shared_experts: int = 0


def _rng(*keys) -> np.random.Generator:
    """A generator seeded by names, stable across runs and machines."""
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


@dataclass
class Template:
    """Who asks what: each request's task and prompt/output lengths (and arrival), without routing.
    `synthesize(like=...)` fills a template, or a real trace, with synthetic routing."""
    task: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrival_s: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_requests(self) -> int:
        return len(self.task)

    @classmethod
    def of(cls, t) -> Template:
        return cls(np.asarray(t.task).astype(str), np.asarray(t.prompt_tokens, np.int32),
                   np.asarray(t.output_tokens, np.int32), None if t.arrival_s is None else np.asarray(t.arrival_s),
                   dict(t.extra))

    def repeat(self, k: int) -> Template:
        """k copies one after another (replicas at the same shape)."""
        return Template(np.tile(self.task, k), np.tile(self.prompt_tokens, k), np.tile(self.output_tokens, k),
                        None, dict(self.extra))


class RoutingModel:
    """The fixed routing structure of one model under one profile."""

    def __init__(self, model, tasks: list[str], profile: RoutingProfile,
                 structure_seed: int = 0, calibrate: bool = True, base: np.ndarray | None = None,
                 calibrate_iters: int | None = None):
        self.model, self.tasks, self.profile = model, list(tasks), profile
        L, E = model.n_moe_layers, model.n_experts
        rng = _rng(model.name, profile.name, structure_seed, "layers")
        layer_base = profile.layer_skew * rng.standard_normal((L, E))
        self.affinity = rng.standard_normal((L, E, E))
        fitted = profile.tasks or {}
        # Groups of tokens sharing a popularity: one per task, or per (task, phase) when
        # prompt tokens route differently from generated ones.
        self.phases = 2 if profile.phase_shift > 0 or fitted else 1
        self.target = np.empty((len(tasks) * self.phases, L, E))
        for i, task in enumerate(tasks):
            if task in fitted:
                for ph, key in enumerate(("decode", "prompt")[:self.phases]):
                    self.target[i * self.phases + ph] = _shares(fitted[task]["popularity"][key])
                continue
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
            self.target[i * self.phases] = p
            if self.phases == 2:
                # Prompt tokens stray from the generated tokens' popularity by the phase shift,
                # the same for every task (it is the model's, not the task's). Generated tokens
                # keep the measured popularity: real decode routing is the less skewed.
                shift = _rng(model.name, profile.name, structure_seed, "phase").standard_normal((L, E))
                self.target[i * 2 + 1] = _shares(p * np.exp(profile.phase_shift * shift))
        # A warm start (the fitter's previous round) needs fewer calibration steps.
        self.base = base.copy() if base is not None and base.shape == self.target.shape else np.log(self.target)
        self.strength = per_layer(profile.path_strength, L)
        self.context = np.clip(per_layer(profile.context_share, L), 0.0, 1.0)
        self.paths = self.contexts = None
        if profile.has_path():
            # Projections drift across layers: corr(W_l, W_l+d) ~ persistence^(d/2); the path's
            # slowly (path_persistence), the context's by its own context_layer_persistence.
            prng = _rng(model.name, profile.name, structure_seed, "path")
            m = int(profile.latent_dim)
            self.paths = _drifting(prng, L, E, m, profile.path_persistence)
            self.contexts = _drifting(prng, L, E, m, profile.context_layer_persistence)
        if calibrate:
            self._calibrate(structure_seed, iters=calibrate_iters or (8 if self.paths is not None else 5))

    def group(self, task_of_tok: np.ndarray, prompt_of_tok: np.ndarray | None) -> np.ndarray:
        """Popularity group of every token (its task, and its phase if phases differ)."""
        if self.phases == 1 or prompt_of_tok is None:
            return task_of_tok * self.phases
        return task_of_tok * 2 + prompt_of_tok.astype(np.int64)

    def latent(self, rng, n_tokens: int, first_of_req: np.ndarray) -> tuple | None:
        """Per-token latent draws (identity, context); None when the profile has no path."""
        if self.paths is None:
            return None
        m = self.paths.shape[2]
        ident = rng.standard_normal((n_tokens, m))
        ctx = _ar1(rng.standard_normal((n_tokens, m)), first_of_req, self.profile.context_persistence)
        return ident, ctx

    def _calibrate(self, seed: int, iters: int = 5, tokens_per_task: int = 8000):
        """Fit B so each group's marginal top-k share per layer matches its target.

        Layer l's draw depends on layer l-1's choices (affinity), so layers are
        fitted in order, each a few fixed-point steps B += log(target / share)."""
        rng = _rng(self.model.name, self.profile.name, seed, "calibrate")
        n_req = tokens_per_task // 10 // self.phases   # many short requests average out request deviations
        G = len(self.target)
        req = np.repeat(np.arange(n_req * G), 10)
        group = req // n_req
        dev = per_layer(self.profile.request_deviation, self.model.n_moe_layers)[None, :, None] * rng.standard_normal(
            (n_req * G, self.model.n_moe_layers, self.model.n_experts))
        lat = None
        if self.paths is not None:   # the marginal of the latent path: independent draws per token
            m = self.paths.shape[2]
            lat = (rng.standard_normal((len(req), m)), rng.standard_normal((len(req), m)))
        self._route(group, req, dev, rng, copy_prob=0.0, calibrate_iters=iters, latent=lat)

    def _route(self, group_of_tok, req_of_tok, deviation, rng, copy_prob, first_of_req=None,
               want_probs=False, calibrate_iters=0, latent=None):
        """Route T tokens through all layers; returns experts, gates (T, L, k) and probs."""
        T = len(group_of_tok)
        L, E, k = self.model.n_moe_layers, self.model.n_experts, self.model.top_k
        experts = np.empty((T, L, k), dtype=expert_dtype(E))
        gates = np.empty((T, L, k), dtype=np.float16)
        probs = np.empty((T, L, E), dtype=np.float16) if want_probs else None
        prev_top1 = None
        ar = np.arange(T)
        n_groups = len(self.target)
        prof = self.profile
        for layer in range(L):
            fixed = deviation[req_of_tok, layer]
            if prev_top1 is not None and prof.cross_layer:
                fixed = fixed + prof.cross_layer * self.affinity[layer, prev_top1]
            if latent is not None and self.strength[layer] > 0:
                # einsum, not @: BLAS threading costs more than it saves on (T, 8) x (8, E)
                s2, w = self.strength[layer] ** 2, self.context[layer]
                fixed = fixed + np.sqrt(s2 * (1 - w)) * np.einsum("tm,em->te", latent[0], self.paths[layer]) \
                    + np.sqrt(s2 * w) * np.einsum("tm,em->te", latent[1], self.contexts[layer])
            prev = None
            for _ in range(calibrate_iters):
                z = self.base[group_of_tok, layer] + fixed + rng.gumbel(size=(T, E))
                top = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < E else np.tile(np.arange(E), (T, 1))
                share = np.bincount((group_of_tok[:, None] * E + top).ravel(), minlength=n_groups * E)
                group_tokens = np.maximum(np.bincount(group_of_tok, minlength=n_groups), 1)[:, None]
                share = share.reshape(n_groups, E) / group_tokens / k
                log_share = np.log(np.maximum(share, 1e-5))
                step = np.log(self.target[:, layer]) - log_share
                if self.paths is not None:
                    # A strong latent blunts how far a share moves with B: divide the step by the
                    # layer's observed response (median d log share / dB), so a few steps suffice.
                    # (Profiles without a latent keep the plain steps, and their traces as they were.)
                    if prev is not None:
                        db = self.base[:, layer] - prev[0]
                        ok = np.abs(db) > 1e-3
                        if ok.any():
                            step /= float(np.clip(np.median((log_share - prev[1])[ok] / db[ok]), 0.2, 1.0))
                    prev = (self.base[:, layer].copy(), log_share)
                    step = np.clip(step, -2.0, 2.0)
                self.base[:, layer] += step
            logits = self.base[group_of_tok, layer] + fixed + rng.gumbel(size=(T, E))
            if copy_prob > 0:
                # Forward fill: a copying token takes the routing of the last
                # non-copying token before it; request starts never copy.
                copy = rng.random(T) < copy_prob
                copy[first_of_req] = False
                src = np.maximum.accumulate(np.where(copy, 0, ar))
                logits = logits[src]
            top, top_logits = top_k(logits, k)
            gates[:, layer] = gate_weights(top_logits, prof.gate_temperature, prof.gate_power)
            experts[:, layer] = top
            if want_probs:
                probs[:, layer] = gate_weights(logits, prof.gate_temperature, prof.gate_power)
            prev_top1 = top[:, 0]
        return experts, gates, probs


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest logits, largest first: (ids, values). k < E: k argmax passes,
    twice as fast as argpartition + argsort at 64 experts (the same choice but for exact
    ties, where argmax takes the first: the logits carry continuous noise)."""
    T, E = logits.shape
    if k >= E:
        top = np.tile(np.arange(E), (T, 1))
        order = np.argsort(-logits, axis=1)
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(logits, order, axis=1)
    rest = logits.copy()
    rows = np.arange(T)
    top = np.empty((T, k), dtype=np.int64)
    vals = np.empty((T, k))
    for i in range(k):
        top[:, i] = best = rest.argmax(axis=1)
        vals[:, i] = rest[rows, best]
        rest[rows, best] = -np.inf
    return top, vals


def _drifting(rng, L: int, E: int, m: int, persistence: float) -> np.ndarray:
    """(L, E, m) row-normalised projections, each layer's = sqrt(p) * previous + sqrt(1 - p) * new."""
    lam = float(np.clip(persistence, 0.0, 1.0))
    w = rng.standard_normal((E, m))
    out = np.empty((L, E, m))
    for layer in range(L):
        if layer:
            w = np.sqrt(lam) * w + np.sqrt(1 - lam) * rng.standard_normal((E, m))
        out[layer] = w / np.linalg.norm(w, axis=1, keepdims=True)
    return out


def gate_weights(logits: np.ndarray, temperature: float, power: float = 1.0) -> np.ndarray:
    """Weights ~ exp(-(max logit - logit)^power / temperature), normalised per row.
    power 1 is a softmax at that temperature."""
    if power == 1.0:
        z = logits / temperature
        g = np.exp(z - z.max(axis=1, keepdims=True))
    else:
        gap = np.maximum(logits.max(axis=1, keepdims=True) - logits, 0.0)
        g = np.exp(-gap ** power / temperature)
    return g / g.sum(axis=1, keepdims=True)


def _shares(p) -> np.ndarray:
    """Shares per layer, floored so a log stays finite, summing to 1."""
    p = np.maximum(np.asarray(p, dtype=float), 1e-4)
    return p / p.sum(axis=-1, keepdims=True)


def _ar1(noise: np.ndarray, first_of_req: np.ndarray, rho: float) -> np.ndarray:
    """c_t = rho c_(t-1) + sqrt(1 - rho^2) noise_t within each request (unit variance);
    a request's first token starts afresh. Stepped by position, vectorised over requests."""
    if rho <= 0 or not len(noise):
        return noise
    T = len(noise)
    start = np.zeros(T, dtype=bool)
    start[first_of_req] = True
    start[0] = True
    pos = np.arange(T) - np.maximum.accumulate(np.where(start, np.arange(T), 0))
    order = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[order], np.arange(int(pos.max()) + 2))
    c = noise.copy()
    keep = np.sqrt(1 - rho * rho)
    for p in range(1, int(pos.max()) + 1):
        rows = order[bounds[p]:bounds[p + 1]]
        c[rows] = rho * c[rows - 1] + keep * noise[rows]
    return c


def _deviations(prof: RoutingProfile, tasks: np.ndarray, last: dict, rng, L: int, E: int) -> np.ndarray:
    """Per-request log-popularity offsets; with recurrence rho, consecutive requests of a
    task share them: D_r = rho * D_prev + sqrt(1 - rho^2) * noise (same variance)."""
    noise = per_layer(prof.request_deviation, L)[None, :, None] * rng.standard_normal((len(tasks), L, E))
    rho = prof.recurrence
    if rho <= 0:
        return noise
    keep = np.sqrt(1 - rho * rho)
    for i, t in enumerate(tasks.tolist()):
        if t in last:
            noise[i] = rho * last[t] + keep * noise[i]
        last[t] = noise[i]
    return noise


def task_lengths(task: str, profile: RoutingProfile | None = None):
    """A task's length distributions: the fitted profile's, else the corpora's (TASKS)."""
    fitted = (profile.tasks or {}) if profile is not None else {}
    if task in fitted:
        d = fitted[task]
        return LengthDist(**d["prompt"]), LengthDist(**d["output"])
    return TASKS[task].prompt, TASKS[task].output


def sample_lengths(task: str, n: int, rng: np.random.Generator, prompt_mean=None, output_mean=None,
                   profile: RoutingProfile | None = None):
    """Prompt and output token counts for n requests of a task (means overridable)."""
    prompt, output = task_lengths(task, profile)
    if prompt_mean:
        prompt = LengthDist(prompt_mean, prompt.sd_log, 1, max(prompt.hi, 8 * prompt_mean))
    if output_mean:
        output = LengthDist(output_mean, output.sd_log, 1, max(output.hi, 4 * output_mean))

    def draw(d):
        mu = np.log(d.mean) - d.sd_log ** 2 / 2   # lognormal with the stated mean
        return np.clip(np.rint(rng.lognormal(mu, d.sd_log, n)), d.lo, d.hi).astype(np.int32)
    return draw(prompt), draw(output)


def routing_shape(model, prof: RoutingProfile):
    """The model to generate for: the given preset/spec, else the fitted profile's shape;
    a fitted profile only drives a model of its own routing shape."""
    shape = prof.shape
    if model is None:
        if shape is None:
            raise UserError("give a model (--model PRESET); only a fitted profile names its own")
        return RoutingShape(shape["name"], int(shape["n_layers"]), int(shape["n_experts"]), int(shape["top_k"]),
                            int(shape.get("n_shared_experts", 0)))
    if not isinstance(model, RoutingShape):
        model = get_model(model)
    if shape is not None and (model.n_moe_layers, model.n_experts, model.top_k) != \
            (shape["n_layers"], shape["n_experts"], shape["top_k"]):
        raise UserError(f"profile '{prof.name}' was fitted on {shape['n_layers']} layers x {shape['n_experts']} "
                         f"experts, top-{shape['top_k']} ({shape['name']}); model '{model.name}' is "
                         f"{model.n_moe_layers} x {model.n_experts}, top-{model.top_k}; fit a profile on a trace "
                         "of this model or drop --model")
    return model


@dataclass
class SynthPlan:
    """A synthetic trace before its routing: every request's task and lengths (drawn up front,
    small), the chunks of whole requests the routing is generated in, and the random stream
    positioned where routing starts. `route_chunk` generates chunk j's routing; called for
    j = 0, 1, ... in order on one stream (and one `last_dev`), it gives synthesize's bytes --
    the eager trace (synthesize) and the lazy one (traces/lazy_trace.py) both generate so."""
    model: object
    prof: RoutingProfile
    rm: RoutingModel
    tasks: list
    task_idx: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    offsets: np.ndarray           # (R + 1,) request r's rows are offsets[r]:offsets[r + 1]
    chunk_starts: np.ndarray      # (C + 1,) chunk j holds requests chunk_starts[j]:chunk_starts[j + 1]
    router_probs: bool
    rng: np.random.Generator      # after the task and length draws: the routing stream
    rate: float | None
    like: object
    extra: dict

    @property
    def n_requests(self) -> int:
        return len(self.task_idx)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_starts) - 1

    def route_chunk(self, j: int, rng: np.random.Generator, last_dev: dict):
        """Chunk j's (experts, gates, probs or None), drawn from rng; last_dev (per task: the
        previous request's deviation) is the recurrence state carried from chunk j - 1."""
        r0, r1 = int(self.chunk_starts[j]), int(self.chunk_starts[j + 1])
        rm, prof, offsets = self.rm, self.prof, self.offsets
        L, E = self.model.n_moe_layers, self.model.n_experts
        lengths = np.diff(offsets[r0:r1 + 1])
        n_tok = int(offsets[r1] - offsets[r0])
        req_of_tok = np.repeat(np.arange(r1 - r0), lengths)
        first = (offsets[r0:r1] - offsets[r0]).astype(np.int64)
        dev = _deviations(prof, self.task_idx[r0:r1], last_dev, rng, L, E)
        lat = rm.latent(rng, n_tok, first)
        in_prompt = None
        if rm.phases == 2:
            in_prompt = (np.arange(n_tok) - first[req_of_tok]) < self.prompt[r0:r1][req_of_tok]
        return rm._route(rm.group(self.task_idx[r0:r1][req_of_tok], in_prompt), req_of_tok, dev, rng,
                         prof.temporal_copy, first_of_req=first, want_probs=self.router_probs, latent=lat)

    def arrivals(self, rng: np.random.Generator) -> np.ndarray | None:
        """The template's arrivals, or `rate` arrivals drawn from rng once all routing is drawn."""
        if self.like is not None and self.like.arrival_s is not None:
            return self.like.arrival_s.copy()
        if self.rate:
            return np.cumsum(rng.exponential(1.0 / self.rate, self.n_requests))
        return None

    def draws_arrivals(self) -> bool:
        """Whether arrivals come from the stream after all routing (so need all of it drawn first)."""
        return bool(self.rate) and (self.like is None or self.like.arrival_s is None)

    def trace(self, experts, gates, probs, arrival, source=None, n_requests: int | None = None) -> Trace:
        """The Trace of these routing arrays; n_requests: of the first requests only (a lazy prefix)."""
        model = self.model
        R = self.n_requests if n_requests is None else n_requests
        return Trace(model=model.name, n_layers=model.n_moe_layers, n_experts=model.n_experts, top_k=model.top_k,
                     request_id=np.array([f"r{i:06d}" for i in range(R)]),
                     task=np.array(self.tasks)[self.task_idx[:R]], prompt_tokens=self.prompt[:R],
                     output_tokens=self.output[:R], experts=experts, gates=gates,
                     arrival_s=None if arrival is None else arrival[:R], prompt_text=None, router_probs=probs,
                     n_shared_experts=model.n_shared_experts, extra=dict(self.extra), source=source)


def plan_synthesis(model, tasks, n_requests: int | None, seed: int = 0, profile="real",
                   task_weights=None, rate: float | None = None, router_probs: bool = False,
                   structure_seed: int = 0, prompt_mean: float | None = None, output_mean: float | None = None,
                   chunk_tokens: int = 400_000, like: Trace | Template | None = None,
                   routing_model: RoutingModel | None = None, **overrides) -> SynthPlan:
    """synthesize's setup (arguments as synthesize): the requests' tasks and lengths, no routing.
    The plan's stream is used up by generating its routing once."""
    prof = resolve_profile(profile)
    if overrides:
        prof = replace(prof, name=prof.name + "+custom", **overrides)
    model = routing_shape(model, prof)
    fitted = prof.tasks or {}
    if like is not None:
        tasks = sorted(set(like.task.tolist()))
        n_requests = like.n_requests
    elif tasks is None:
        if not fitted:
            raise UserError("give tasks (--tasks); only a fitted profile lists its own")
        tasks = list(fitted)
        if task_weights is None:
            task_weights = [fitted[t]["weight"] for t in tasks]
    tasks = list(tasks)
    known = set(fitted) if fitted else set(TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f"profile '{prof.name}' was fitted on" if fitted else "known tasks:"
        raise UserError(f"unknown task(s) {unknown}; {where} {', '.join(sorted(known))}")
    if n_requests is None or n_requests < 1:
        raise UserError("n_requests must be at least 1")
    rm = routing_model if routing_model is not None else RoutingModel(model, tasks, prof, structure_seed)

    rng = np.random.default_rng(seed)
    if like is not None:
        task_idx = np.searchsorted(np.array(tasks), like.task)
        prompt, output = like.prompt_tokens.copy(), like.output_tokens.copy()
    else:
        w = np.ones(len(tasks)) if task_weights is None else np.asarray(task_weights, float)
        task_idx = rng.choice(len(tasks), size=n_requests, p=w / w.sum())
        prompt = np.empty(n_requests, np.int32)
        output = np.empty(n_requests, np.int32)
        for i, t in enumerate(tasks):
            sel = task_idx == i
            prompt[sel], output[sel] = sample_lengths(t, int(sel.sum()), rng, prompt_mean, output_mean, prof)
    lengths = prompt.astype(np.int64) + output
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts = [0]
    while starts[-1] < n_requests:   # chunks of whole requests bound memory
        r0 = starts[-1]
        r1 = int(np.searchsorted(offsets, offsets[r0] + chunk_tokens, side="right")) - 1
        starts.append(max(r1, r0 + 1))
    extra = dict(generator="emoe trace synth", profile=profile_dict(prof), seed=seed, structure_seed=structure_seed,
                 tasks=tasks, rate=rate)
    if like is not None:
        extra["like"] = like.extra.get("source", getattr(like, "model", "template"))
    return SynthPlan(model=model, prof=prof, rm=rm, tasks=tasks, task_idx=task_idx, prompt=prompt, output=output,
                     offsets=offsets, chunk_starts=np.array(starts, dtype=np.int64), router_probs=router_probs,
                     rng=rng, rate=rate, like=like, extra=extra)


def synthesize(model, tasks, n_requests: int | None, seed: int = 0, profile="real",
               task_weights=None, rate: float | None = None, router_probs: bool = False,
               structure_seed: int = 0, prompt_mean: float | None = None, output_mean: float | None = None,
               chunk_tokens: int = 400_000, progress=None, like: Trace | Template | None = None,
               routing_model: RoutingModel | None = None, **overrides) -> Trace:
    """Generate a trace. `profile`: a built-in name, a fitted profile (.yaml path or object).
    `overrides` replace single profile knobs (e.g. request_deviation=0.3). `like`: copy each
    request's task, prompt and output lengths (and arrivals) from this trace or Template, so the
    synthetic trace has exactly its shape. tasks=None: the fitted profile's tasks and shares.
    `routing_model`: a RoutingModel already built for these tasks and profile (the fitter's).
    The whole trace is held in memory; traces/lazy_trace.py generates one chunk at a time."""
    plan = plan_synthesis(model, tasks, n_requests, seed=seed, profile=profile, task_weights=task_weights,
                          rate=rate, router_probs=router_probs, structure_seed=structure_seed,
                          prompt_mean=prompt_mean, output_mean=output_mean, chunk_tokens=chunk_tokens, like=like,
                          routing_model=routing_model, **overrides)
    m = plan.model
    T = int(plan.offsets[-1])
    L, E, k = m.n_moe_layers, m.n_experts, m.top_k
    experts = np.empty((T, L, k), dtype=expert_dtype(E))
    gates = np.empty((T, L, k), dtype=np.float16)
    probs = np.empty((T, L, E), dtype=np.float16) if router_probs else None
    last_dev: dict[int, np.ndarray] = {}   # per task: the previous request's deviation (recurrence)
    for j in range(plan.n_chunks):
        e, g, p = plan.route_chunk(j, plan.rng, last_dev)
        r0, r1 = plan.chunk_starts[j], plan.chunk_starts[j + 1]
        sl = slice(int(plan.offsets[r0]), int(plan.offsets[r1]))
        experts[sl], gates[sl] = e, g
        if router_probs:
            probs[sl] = p
        if progress:
            progress(int(r1 - r0))
    return plan.trace(experts, gates, probs, plan.arrivals(plan.rng))
