"""Prompt sets per task from the real corpora in ../shared/data/corpora.

Each example is {task, prompt, reference}: the prompt uses a fixed template per
task (what the task identifier's keywords and the small MoE were trained on);
the reference is the corpus's own continuation (answer, solution, summary,
translation, rest of the text), used for perplexity in `emoe accuracy`.
The last 10% of each source is held out from training the small MoE; prompt sets
are drawn from that part.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

TASKS = ("math", "code", "qa", "summarization", "translation", "general")
TEMPLATES = {
    "math": "Solve the math problem: {q}\nAnswer: ",
    "code": "Complete the Python function:\n{q}",
    "qa": "Answer the question: {q}?\nAnswer: ",
    "summarization": "Summarize the dialogue:\n{q}\nSummary: ",
    "translation": "Translate English to German: {q}\nGerman: ",
    "general": "{q}",
}


def _jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def load_task_examples(task: str, data_dir) -> list[dict]:
    d = Path(data_dir)
    if not d.exists():
        raise FileNotFoundError(f"corpora directory '{d}' does not exist (expected ../shared/data/corpora)")
    t = TEMPLATES[task]
    out = []
    if task == "math":
        for r in _jsonl(d / "gsm8k-test.jsonl"):
            out.append((r["question"], r["answer"]))
    elif task == "code":
        for r in _jsonl(d / "humaneval.jsonl.gz"):
            out.append((r["prompt"], r["canonical_solution"]))
    elif task == "qa":
        for r in _jsonl(d / "nq-open-dev.jsonl"):
            ans = r["answer"][0] if isinstance(r["answer"], list) else r["answer"]
            out.append((r["question"], ans))
    elif task == "summarization":
        for r in _jsonl(d / "dialogsum-dev.jsonl"):
            out.append((r["dialogue"], r["summary"]))
        for r in _jsonl(d / "dialogsum-test.jsonl"):
            out.append((r["dialogue"], r["summary1"]))
    elif task == "translation":
        en, de = _lines(d / "multi30k-train.en.gz")[:6000], _lines(d / "multi30k-train.de.gz")[:6000]
        out = list(zip(en, de))
    elif task == "general":
        rng = random.Random(0)
        for name in ("olmoe-text-c4.txt", "olmoe-text-arxiv.txt", "olmoe-text-github_oss_with_stack.txt"):
            words = (d / name).read_text(encoding="utf-8").split(" ")
            for s in range(0, len(words) - 160, 160):
                chunk = words[s:s + 160]
                cut = rng.randint(20, 60)
                out.append((" ".join(chunk[:cut]), " " + " ".join(chunk[cut:])))
    else:
        raise ValueError(f"unknown task '{task}'; choose from {TASKS}")
    return [dict(task=task, prompt=t.format(q=q), reference=ref) for q, ref in out]


def heldout_prompts(data_dir, per_task: int = 20, tasks=TASKS, seed: int = 0) -> list[dict]:
    """`per_task` prompts from the held-out tenth of each source, shuffled across tasks."""
    rng = random.Random(seed)
    rows = []
    for task in tasks:
        ex = load_task_examples(task, data_dir)
        held = ex[int(len(ex) * 0.9):]
        rows += rng.sample(held, min(per_task, len(held)))
    rng.shuffle(rows)
    return rows


def write_prompts(rows: list[dict], path) -> Path:
    from traces.atomic import write_text   # a crash leaves the old file or the new one
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
