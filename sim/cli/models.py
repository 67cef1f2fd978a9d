"""`emoe models`: the model presets and their derived sizes."""
from __future__ import annotations


def add_parsers(sub):
    s = sub.add_parser("models", help="list model presets and their derived sizes")
    s.set_defaults(func=models)


def models(a):
    from traces.model_shape import PRESETS
    print(f"{'preset':20s}{'params':>9s}{'MoE layers':>11s}{'experts':>8s}{'top-k':>6s}{'shared':>7s}"
          f"{'MB/expert':>10s}{'dense GB':>9s}{'experts GB':>11s}{'KV KB/tok':>10s}")
    for m in PRESETS.values():
        print(f"{m.name:20s}{m.total_params / 1e9:8.2f}B{m.n_moe_layers:11d}{m.n_experts:8d}{m.top_k:6d}"
              f"{m.n_shared_experts:7d}{m.bytes_per_expert / 1e6:10.1f}{m.dense_bytes / 1e9:9.2f}"
              f"{m.expert_bytes_total / 1e9:11.2f}{m.kv_bytes_per_token / 1024:10.1f}")
