"""Task identification (eMoE mechanism 1): the trace's label, or keywords in the prompt.

The keyword classifier counts, per task, how many of its profiled keywords occur
in the lower-cased prompt; the task with most matches wins (ties: the order
below). A configurable mis-identification rate replaces the answer with another
task, for the paper's robustness test (20% raised latency by <10%).
"""
from __future__ import annotations

import re

import numpy as np

# Profiled keywords per task (prompt templates and corpora in ../shared/data).
KEYWORDS: dict[str, tuple[str, ...]] = {
    "summarization": ("summarize", "summarise", "summary", "tl;dr", "#person1#", "dialogue", "in short"),
    "translation": ("translate", "translation", "german", "french", "english:", "into english", "into german"),
    "code": ("def ", "return", "python", "function", "import ", "code", ">>>", "class ", "implement"),
    "math": ("how many", "how much", "calculate", "solve", "total", "each", "per ", "$", "percent"),
    "classification": ("sentiment", "classify", "positive", "negative", "neutral", "category", "label"),
    "comparison": ("similar", "compare", "same meaning", "headline", "difference between", "versus"),
    "qa": ("who ", "when ", "where ", "which ", "what ", "question:", "answer the question"),
    "conversation": ("hi ", "hello", "chat", "tell me", "can you", "i think", "let's talk", "how are you"),
}


def classify(prompt: str, tasks=None) -> str | None:
    """Most keyword matches wins; None when nothing matches."""
    text = prompt.lower()
    best, best_n = None, 0
    for task, words in KEYWORDS.items():
        if tasks is not None and task not in tasks:
            continue
        n = sum(len(re.findall(re.escape(w), text)) for w in words)
        if n > best_n:
            best, best_n = task, n
    return best


class TaskIdentifier:
    """mode 'label' (the trace's task) or 'keywords' (classify the prompt text)."""

    def __init__(self, tasks, mode: str = "label", misid_rate: float = 0.0, seed: int = 0):
        if mode not in ("label", "keywords"):
            raise ValueError(f"task identification mode must be 'label' or 'keywords', got {mode!r}")
        if not 0 <= misid_rate <= 1:
            raise ValueError(f"misid_rate must be in [0, 1], got {misid_rate!r}")
        self.tasks = sorted(tasks)
        self.mode, self.misid_rate = mode, misid_rate
        self.rng = np.random.default_rng([seed, 0x7A5C])

    def identify(self, label: str, prompt: str | None = None) -> str:
        task = label
        if self.mode == "keywords":
            if prompt is None:
                raise ValueError("task identification by keywords needs prompt text in the trace "
                                 "(`prompt_text`); use mode 'label' otherwise")
            task = classify(prompt, self.tasks) or label
        if self.misid_rate and len(self.tasks) > 1 and self.rng.random() < self.misid_rate:
            others = [t for t in self.tasks if t != task]
            task = others[int(self.rng.integers(len(others)))]
        return task
