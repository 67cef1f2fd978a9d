"""Expected expert demand of the coming p prompts: the one meaning of eMoE's interval p.

PAPER.md mechanisms 3 and 5: the predictor runs every p prompts and its expert set serves
the next p. Those prompts have not arrived, so their task mix is estimated from the prompts
that have: the last p arrivals (the one that triggers the invocation included, never a
later one). For each task t with T_t prompts in that window,

    N_i = p / n * sum_t (sum_j W_j + T_t * W_o,t) * s_t * f_t,i

with n the window's length, W_j the window's prompt lengths of task t, W_o,t the task's
expected output length, s_t its per-layer sensitivity (skip rule) and f_t its predicted
expert shares. p / n scales the window to p prompts, so N is expected tokens per expert
over the interval (the ranking does not depend on it). The simulator's eMoE policy and
`emoe accuracy` both call `coming_demand`, and both hold the chosen set for p prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Arrival:
    """A prompt that has arrived, as the predictor may know it."""
    task: str                 # the identified task
    prompt_tokens: float      # W_j: known once the prompt has arrived
    expected_output: float    # W_o of its task: what a server may know before generating
    index: int = -1           # its position in the workload (the perfect predictor's key)


def invocation_due(n_arrived: int, p: int) -> bool:
    """The predictor runs at the first arrival and every p arrivals after it."""
    return (n_arrived - 1) % p == 0


def coming_demand(recent: Sequence[Arrival], p: int, shape: tuple[int, int],
                  shares: Callable[[str, list], np.ndarray | None],
                  sensitivity: Callable[[str], np.ndarray] | None = None,
                  task_aware: bool = True) -> np.ndarray:
    """(L, E) expected tokens per expert over the coming p prompts, from the last p of `recent`.

    shares(task, arrivals of that task in the window) -> f (L, E), or None when nothing is
    known of the task yet (it then adds no demand). task_aware False weights each prompt by
    one instead of its tokens (the ablation)."""
    window = list(recent)[-p:]
    N = np.zeros(shape)
    if not window:
        return N
    by_task: dict[str, list] = {}
    for a in window:
        by_task.setdefault(a.task, []).append(a)
    for task, arrivals in by_task.items():
        f = shares(task, arrivals)
        if f is None:
            continue
        if task_aware:
            weight = sum(a.prompt_tokens + a.expected_output for a in arrivals)   # sum W_j + T * W_o
        else:
            weight = len(arrivals)
        s = np.ones(shape[0]) if sensitivity is None else sensitivity(task)
        N += weight * s[:, None] * f
    return N * (p / len(window))
