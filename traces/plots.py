"""Heatmaps of a trace's routing: popularity per task and layer-to-layer transitions."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.format import Trace
from traces.stats import layer_transitions, popularity


def _plt():
    import matplotlib.pyplot as plt   # the CLI sets MPLBACKEND=Agg; notebooks keep theirs
    return plt


def plot_trace(t: Trace, out_dir, tokens: str = "all") -> list[Path]:
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    pop = popularity(t, tokens)
    n = len(pop)
    fig, axes = plt.subplots(1, n, figsize=(max(4, 0.25 * t.n_experts + 2) * n, 0.18 * t.n_layers + 2.5),
                             squeeze=False, sharey=True)
    vmax = max(float(p.max()) for p in pop.values())
    for ax, (task, p) in zip(axes[0], pop.items()):
        im = ax.imshow(p, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{task}")
        ax.set_xlabel("expert id")
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of top-k selections")
    fig.suptitle(f"Expert popularity per task ({t.model}, {tokens} tokens)")
    for ext in ("png", "svg"):
        p = out / f"popularity.{ext}"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        written.append(p)
    plt.close(fig)

    if t.n_layers > 1:
        trans = layer_transitions(t, tokens)
        layers = sorted({0, t.n_layers // 2 - 1, t.n_layers - 2})
        fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4.2 * (len(layers) + 1), 4), squeeze=False)
        for ax, l in zip(axes[0], layers):
            im = ax.imshow(trans[l], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {l} -> {l + 1}")
            ax.set_xlabel(f"top-1 expert at layer {l + 1}")
            ax.set_ylabel(f"top-1 expert at layer {l}")
        fig.colorbar(im, ax=axes[0][:-1].tolist(), label="P(next | current)")
        ax = axes[0][-1]
        # How concentrated transitions are, per layer pair: max row probability averaged.
        ax.plot(np.arange(len(trans)), trans.max(axis=2).mean(axis=1), marker=".")
        ax.axhline(1 / t.n_experts, ls="--", c="grey", label="independent layers")
        ax.set_xlabel("layer l (pair l -> l+1)")
        ax.set_ylabel("mean max transition probability")
        ax.legend()
        fig.suptitle("Layer-to-layer transitions of the top-1 expert")
        for ext in ("png", "svg"):
            p = out / f"transitions.{ext}"
            fig.savefig(p, dpi=110, bbox_inches="tight")
            written.append(p)
        plt.close(fig)
    return written
