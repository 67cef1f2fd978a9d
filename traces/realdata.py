"""Figures measured on real models and real text: the defaults of the synthetic generator.

Every number here is a measurement, and its source is stated beside it, so a
user can see what a synthetic trace is calibrated to and change it in one place.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"

# Real Mixtral-8x7B-Instruct decode traces (vLLM, top-2, 32 layers; code and math
# prompts, 80-255 generated tokens each), as reported in the foundation issue.
# The generator's `real` profile sits inside these ranges (tests check it). Gini and
# top share are per request and layer: pooled over requests they could not exceed
# the per-request Gini of 0.19 that issue 12 measured (pooling averages the counts),
# and with an inter-prompt correlation of 0.44 pooling must lower them well below it.
REAL_DECODE_TRACE = {
    "gini": (0.16, 0.22),                      # Gini of a request's expert counts per layer
    "top_share": (0.35, 0.38),                 # share of a request's 2 most used experts
    "temporal_reuse": (0.34, 0.41),            # share of a token's experts reused by the next token
    "cross_layer_correlation": (0.19, 0.36),   # NMI of top-1 experts of consecutive layers
    "inter_prompt_correlation": (0.42, 0.46),  # Pearson of two prompts' layer x expert counts
}
# Real Mixtral-8x7B-Instruct decode routing of code and math prompts (vLLM dumps,
# 80-250 generated tokens per request), as measured in issue 12 with the definitions
# of traces/stats.py. The dumps are not shipped; the figures are. They were measured
# per request and on a few requests at a time: the old generator reproduces that
# issue's column for it at REFERENCE_SHAPE (README "Synthetic traces and their
# calibration"), which pins both the definitions and the shape.
REAL_MIXTRAL_STRUCTURE = {
    "request_gini": 0.19, "effective_experts": 7.5,
    "nmi_1": 0.34, "nmi_2": 0.32, "nmi_4": 0.30,
    "reuse_1": 0.38, "reuse_4_16": 0.28, "reuse_first_layer": 0.26, "reuse_last_layers": 0.30,
    "gate_median": 0.70, "gate_top1_over_0_9": 0.093,
    "prompt_decode_divergence": 0.042, "specialisation": 0.031, "inter_prompt_correlation": 0.44,
}
# The same table's column for the generator before issue 12 (its `real` profile).
OLD_REAL_PROFILE_STRUCTURE = {
    "request_gini": 0.33, "effective_experts": 6.6, "nmi_1": 0.38, "nmi_2": 0.19, "nmi_4": 0.12,
    "reuse_1": 0.38, "reuse_4_16": 0.345, "gate_median": 0.75, "gate_top1_over_0_9": 0.224,
    "prompt_decode_divergence": 0.012, "specialisation": 0.069, "inter_prompt_correlation": 0.46,
}
# "A few requests": 4 (code, math, code, math), prompts of ~110 tokens, 80-255 generated
# tokens averaging ~130 (TASKS' spreads below): the shape at which the old generator
# reproduces every row of the column for it within 5% (README).
REFERENCE_SHAPE = dict(tasks=("code", "math", "code", "math"), prompt_mean=110, output_mean=130, tokens="decode")
REFERENCES = {
    "mixtral-8x7b-instruct": dict(stats=REAL_MIXTRAL_STRUCTURE, requests=len(REFERENCE_SHAPE["tasks"]),
                                  tokens="decode"),
}

# PAPER.md (eMoE, arXiv 2503.06823): consecutive prompts 0.75-0.95 (Mixtral),
# consecutive layers ~0.50. Reached by the generator's `paper` profile.
PAPER_FIGURES = {"inter_prompt_correlation": (0.75, 0.95), "successor_correlation": (0.48, 0.55),
                 "cross_layer_correlation": (0.40, 0.60)}


@dataclass(frozen=True)
class LengthDist:
    """Token count ~ lognormal with this mean and log-space sd, clipped to [lo, hi]."""
    mean: float
    sd_log: float
    lo: int = 1
    hi: int = 1000   # the paper caps generation at 1000 tokens


@dataclass(frozen=True)
class TaskProfile:
    prompt: LengthDist
    output: LengthDist
    domain: str      # routing-stats domain whose measured popularity the task follows
    source: str


# Prompt and reference-output lengths measured on ../shared/data/corpora
# (BPE tokens estimated as 1.3 x whitespace words; code as characters / 4).
TASKS: dict[str, TaskProfile] = {
    "math": TaskProfile(LengthDist(60, 0.36), LengthDist(168, 0.30, 80, 255), "arxiv",
                        "prompt: gsm8k-test questions (n=1319); output: real Mixtral decode traces, 80-255 tokens"),
    "code": TaskProfile(LengthDist(113, 0.48), LengthDist(168, 0.30, 80, 255), "github",
                        "prompt: HumanEval prompts (n=164); output: real Mixtral decode traces, 80-255 tokens"),
    "qa": TaskProfile(LengthDist(12, 0.15, 4), LengthDist(5, 0.57), "wikipedia",
                      "nq-open dev questions and reference answers (n=3610)"),
    "summarization": TaskProfile(LengthDist(175, 0.52, 16), LengthDist(25, 0.43), "book",
                                 "dialogsum test dialogues and reference summaries (n=500)"),
    "translation": TaskProfile(LengthDist(15, 0.29, 3), LengthDist(14, 0.31), "c4",
                               "multi30k test2016 en->de aligned lines (n=1000)"),
    # No corpus ships for these three: PAPER.md's observations (conversation longest,
    # about 2x other tasks; classification/comparison answer with a label).
    "conversation": TaskProfile(LengthDist(150, 0.6, 8), LengthDist(300, 0.6, 8), "c4",
                                "assumption from PAPER.md: conversation has the longest outputs"),
    "classification": TaskProfile(LengthDist(40, 0.4, 8), LengthDist(3, 0.3), "c4",
                                  "assumption: financial-tweet sentiment, a one-word label"),
    "comparison": TaskProfile(LengthDist(40, 0.4, 8), LengthDist(3, 0.3), "wikipedia",
                              "assumption: headline similarity, a one-word label"),
}


@cache
def routing_stats(model: str) -> dict | None:
    """Measured per-domain expert popularity of a real model, or None if not shipped.

    Files: traces/data/routing-stats-<model>.json, derived from allenai/OLMoE
    scripts/routing_output (Apache-2.0): per domain, top-k expert counts at
    MoE layers 0, 7 and 15.
    """
    p = DATA / f"routing-stats-{model}.json"
    if not p.exists():
        return None
    return json.loads(p.read_text())


def measured_popularity(model: str, domain: str) -> dict[int, np.ndarray]:
    """layer -> share of top-k selections per expert, for the layers measured."""
    rs = routing_stats(model)
    if rs is None:
        return {}
    doms = rs["domains"]
    if domain not in doms:
        domain = "c4" if "c4" in doms else next(iter(doms))
    out = {}
    for layer, counts in doms[domain]["expert_counts"].items():
        v = np.array([counts[str(e)] for e in range(rs["n_experts"])], dtype=float)
        out[int(layer)] = v / v.sum()
    return out
