"""The real effect of expert restriction on a real model: quality per task, and sensitivity.

RouterControl wraps every MoE router of a Hugging Face model so that, per layer,
only allowed experts can be chosen (a masked expert's tokens go to their
next-ranked allowed expert, the architecture's own selection rule otherwise), or
so that routing is random (for sensitivity profiling).

- `accuracy`: per task, perplexity of the reference continuation and top-1
  agreement with the unrestricted model, with the experts a policy would keep:
  `random` (a fixed random subset), `frequency` (the most used experts over all
  earlier prompts), or `emoe` (every p prompts, the experts with the largest
  expected tokens N_i of the coming p prompts, `sim.demand.coming_demand`: the task
  mix of the last p prompts that have arrived, each task's routing frequencies over
  its earlier prompts (all earlier prompts' for a task not seen yet) and expected
  lengths; the set is held for p prompts. As in the simulator, the first prompt runs
  with every expert and the first prompt after it predicts at once).
- `sensitivity`: per task, routing randomised in layers 0..m-1 (from the input side)
  for m = 0..L; a layer is insensitive (s = 0) while agreement stays at or above
  the threshold. The table is the one the eMoE policy's skip rule reads.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from replay.options import KEEP_RULES
from sim.demand import Arrival, coming_demand, invocation_due
from traces.capture import moe_modules, moe_shape, select


class RouterControl:
    def __init__(self, model, seed: int = 0):
        self.model = model
        self.mlps = moe_modules(model)
        self.E, self.k, self.mt = moe_shape(model.config)
        self.L = len(self.mlps)
        self.allowed = None             # (L, E) bool, or None: unrestricted
        self.random_layers: set = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.last_logits: list = [None] * self.L
        self._orig = []

    def __enter__(self):
        for li, mlp in enumerate(self.mlps):
            router = mlp.gate
            orig = router.forward
            self._orig.append((router, orig))
            router.forward = self._wrap(li, mlp, orig)
        return self

    def __exit__(self, *exc):
        for router, orig in self._orig:
            router.forward = orig
        self._orig.clear()

    def _wrap(self, li, mlp, orig):
        scale = float(getattr(self.model.config, "routed_scaling_factor", 1.0) or 1.0) \
            if self.mt == "deepseek_v3" else 1.0

        def forward(hidden):
            logits, weights, idx = orig(hidden)
            self.last_logits[li] = logits.detach()
            if li in self.random_layers:
                noise = torch.rand(logits.shape, generator=self.gen).to(logits.device)
                sel = noise.topk(self.k, dim=-1).indices
                probs = torch.softmax(logits.float(), dim=-1).gather(1, sel)
                gates = probs / probs.sum(-1, keepdim=True)
                return logits, gates.to(weights.dtype), sel.to(idx.dtype)
            if self.allowed is None:
                return logits, weights, idx
            mask = torch.as_tensor(~self.allowed[li], device=logits.device)
            masked = logits.float().masked_fill(mask, float("-inf"))
            experts, gates, _ = select(masked, self.model.config, mlp)
            return logits, (gates * scale).to(weights.dtype), experts.to(idx.dtype)
        return forward


def _encode(tok, ex):
    p = tok(ex["prompt"])["input_ids"]
    r = tok(ex["reference"])["input_ids"][:128]
    return torch.tensor([p + r]), len(p), len(r)


def _score(model, ids, n_prompt, n_ref):
    """(top-1 predictions, NLL per reference token, router logits per layer) for one example."""
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    pos = slice(n_prompt - 1, n_prompt - 1 + n_ref)
    target = ids[0, n_prompt:n_prompt + n_ref]
    nll = torch.nn.functional.cross_entropy(logits[pos], target, reduction="none")
    return logits[pos].argmax(-1), nll


def _routing_counts(ctrl: RouterControl, n_tokens: int) -> np.ndarray:
    """(L, E) gate mass the unrestricted router gave each expert in the last forward pass:
    the share a restriction keeps is the simulator's routing fidelity (gate mass kept)."""
    out = np.zeros((ctrl.L, ctrl.E))
    for li, (lg, mlp) in enumerate(zip(ctrl.last_logits, ctrl.mlps)):
        experts, gates, _ = select(lg[-n_tokens:], ctrl.model.config, mlp)
        g = gates / gates.sum(-1, keepdim=True)
        out[li] = np.bincount(experts.flatten().numpy(), weights=g.flatten().numpy(), minlength=ctrl.E)
    return out


def _top_per_layer(score: np.ndarray, n: int) -> np.ndarray:
    allowed = np.zeros(score.shape, dtype=bool)
    order = np.argsort(-score, axis=1, kind="stable")[:, :n]
    np.put_along_axis(allowed, order, True, axis=1)
    return allowed


def prompt_records(model, tok, examples: list[dict], policy: str = "emoe", capacity: float = 0.5,
                   interval: int = 1, seed: int = 0):
    """Per prompt, in order: its task, NLLs and top-1 agreement with and without the policy's
    experts, and the routing fidelity of the restriction. The experts for prompt j are chosen
    from prompts 0..j only (the routing of 0..j-1, the task and length of j)."""
    if policy not in KEEP_RULES:
        raise ValueError(f"policy must be one of {', '.join(KEEP_RULES)}, got '{policy}'")
    model.eval()
    ctrl = RouterControl(model, seed)
    n_keep = max(int(round(capacity * ctrl.E)), ctrl.k)
    rng = np.random.default_rng(seed)
    fixed_random = np.zeros((ctrl.L, ctrl.E), dtype=bool)
    for li in range(ctrl.L):
        fixed_random[li, rng.choice(ctrl.E, n_keep, replace=False)] = True
    hist: dict[str, np.ndarray] = {}          # task -> routing counts of its earlier prompts
    out_len: dict[str, list] = {}             # task -> reference lengths of its earlier prompts
    total = np.zeros((ctrl.L, ctrl.E))
    recent: list[Arrival] = []
    allowed = None

    def shares(task, arrivals):               # the task's frequencies; all prompts' for a new task
        c = hist.get(task, total)
        return c / c.sum(axis=1, keepdims=True) if c.sum() else None

    with ctrl:
        for j, ex in enumerate(examples):
            ids, n_p, n_r = _encode(tok, ex)
            ctrl.allowed = None
            ref_top, ref_nll = _score(model, ids, n_p, n_r)
            counts = _routing_counts(ctrl, ids.shape[1])
            # Which experts the policy has loaded for this prompt (decided before seeing its routing).
            if policy == "all":
                allowed = None
            elif policy == "random":
                allowed = fixed_random
            elif policy == "frequency":
                allowed = _top_per_layer(total, n_keep) if total.sum() else None
            else:
                lens = out_len.get(ex["task"]) or [x for v in out_len.values() for x in v] or [0]
                recent.append(Arrival(ex["task"], n_p, float(np.mean(lens)), j))
                if invocation_due(j + 1, interval) or (allowed is None and total.sum()):
                    demand = coming_demand(recent, interval, (ctrl.L, ctrl.E), shares)
                    allowed = _top_per_layer(demand, n_keep) if demand.sum() else None   # nothing known: all
            ctrl.allowed = allowed
            top, nll = _score(model, ids, n_p, n_r)
            kept = 1.0 if allowed is None else float((counts * allowed).sum() / counts.sum())
            yield dict(task=ex["task"], nll=nll.tolist(), ref_nll=ref_nll.tolist(),
                       agree=(top == ref_top).tolist(), fidelity=kept,
                       allowed=None if allowed is None else allowed.copy())
            hist[ex["task"]] = hist.get(ex["task"], 0) + counts
            out_len.setdefault(ex["task"], []).append(n_r)
            total += counts


def accuracy(model, tok, examples: list[dict], policy: str = "emoe", capacity: float = 0.5, interval: int = 1,
             seed: int = 0) -> dict:
    """Per-task quality with the policy's experts vs the unrestricted model."""
    per = {}
    for rec in prompt_records(model, tok, examples, policy, capacity, interval, seed):
        d = per.setdefault(rec["task"], dict(nll=[], agree=[], ref_nll=[], fidelity=[]))
        d["nll"] += rec["nll"]
        d["ref_nll"] += rec["ref_nll"]
        d["agree"] += rec["agree"]
        d["fidelity"].append(rec["fidelity"])
    return {task: dict(perplexity=math.exp(np.mean(d["nll"])), perplexity_all_experts=math.exp(np.mean(d["ref_nll"])),
                       agreement=float(np.mean(d["agree"])), routing_fidelity=float(np.mean(d["fidelity"])),
                       prompts=len(d["fidelity"]))
            for task, d in sorted(per.items())}


def sensitivity(model, tok, examples: list[dict], threshold: float = 0.85, seed: int = 0) -> dict:
    """Per task: agreement with layers 0..m-1 randomised, and s per layer."""
    model.eval()
    ctrl = RouterControl(model, seed)
    L = ctrl.L
    by_task: dict[str, list] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append(ex)
    curves, table = {}, {}
    with ctrl:
        for task, exs in sorted(by_task.items()):
            enc = [_encode(tok, ex) for ex in exs]
            ctrl.random_layers = set()
            refs = [_score(model, ids, p, r)[0] for ids, p, r in enc]
            agree = []
            for m in range(1, L + 1):
                ctrl.random_layers = set(range(m))
                hits = [float((_score(model, ids, p, r)[0] == ref).float().mean())
                        for (ids, p, r), ref in zip(enc, refs)]
                agree.append(float(np.mean(hits)))
            ctrl.random_layers = set()
            curves[task] = agree
            s = []
            for m in range(L):   # layer m is insensitive while randomising 0..m keeps agreement
                s.append(0 if all(a >= threshold for a in agree[:m + 1]) else 1)
            table[task] = s
    return dict(curves=curves, tasks=table, threshold=threshold)
