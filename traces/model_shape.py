"""MoE model shapes: public config figures and the sizes derived from them.

A ModelSpec is everything the simulator needs to know about a model: the routing
shape (MoE layers, experts, top-k, shared experts) and the byte sizes of its
parts (one routed expert, the dense remainder, the KV cache per token).

It lives in `traces`, the ground floor, because a trace records its model's shape
(the `model_shape` meta of traces/format.py); `sim` and `replay` read it from here.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int             # model dimension
    expert_ffn: int         # intermediate size of one routed expert
    n_layers: int           # transformer layers
    n_moe_layers: int       # of which have routed experts
    n_experts: int          # routed experts per MoE layer
    top_k: int              # experts chosen per token per MoE layer
    n_heads: int
    n_kv_heads: int
    vocab: int
    dtype_bytes: int = 2    # bf16
    head_dim: int = 0       # 0 -> hidden // n_heads
    n_shared_experts: int = 0
    shared_ffn: int = 0     # intermediate size of one shared expert (0 -> expert_ffn)
    dense_ffn: int = 0      # FFN size of the non-MoE layers (n_layers - n_moe_layers)
    tied_embeddings: bool = False
    # Multi-head latent attention (DeepSeek) caches a compressed KV; 0 = standard GQA.
    kv_cache_dim: int = 0   # per layer per token elements, overrides 2*kv_heads*head_dim
    attn_params: int = 0    # per layer, overrides the GQA formula
    source: str = ""

    def __post_init__(self):
        for f in ("hidden", "expert_ffn", "n_layers", "n_moe_layers", "n_experts",
                  "top_k", "n_heads", "n_kv_heads", "vocab", "dtype_bytes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model '{self.name}': {f} must be a positive integer, got {v!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"model '{self.name}': top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_moe_layers > self.n_layers:
            raise ValueError(f"model '{self.name}': n_moe_layers={self.n_moe_layers} exceeds n_layers={self.n_layers}")

    # ---- derived sizes -------------------------------------------------
    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.n_heads

    @property
    def expert_params(self) -> int:
        # SwiGLU expert: gate, up and down projections.
        return 3 * self.hidden * self.expert_ffn

    @property
    def bytes_per_expert(self) -> int:
        return self.expert_params * self.dtype_bytes

    @property
    def attention_params_per_layer(self) -> int:
        if self.attn_params:
            return self.attn_params
        q = self.hidden * self.n_heads * self.hd
        kv = 2 * self.hidden * self.n_kv_heads * self.hd
        o = self.n_heads * self.hd * self.hidden
        return q + kv + o

    @property
    def dense_params(self) -> int:
        """Everything that is not a routed expert: always resident on the GPU."""
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.n_layers + 1) * self.hidden
        attn = self.n_layers * self.attention_params_per_layer
        router = self.n_moe_layers * self.hidden * self.n_experts
        shared = self.n_moe_layers * self.n_shared_experts * 3 * self.hidden * (self.shared_ffn or self.expert_ffn)
        dense_ffn = (self.n_layers - self.n_moe_layers) * 3 * self.hidden * self.dense_ffn
        return emb + norms + attn + router + shared + dense_ffn

    @property
    def dense_bytes(self) -> int:
        return self.dense_params * self.dtype_bytes

    @property
    def total_experts(self) -> int:
        return self.n_moe_layers * self.n_experts

    @property
    def expert_bytes_total(self) -> int:
        return self.total_experts * self.bytes_per_expert

    @property
    def total_params(self) -> int:
        return self.dense_params + self.total_experts * self.expert_params

    @property
    def kv_bytes_per_token(self) -> int:
        per_layer = self.kv_cache_dim or 2 * self.n_kv_heads * self.hd
        return self.n_layers * per_layer * self.dtype_bytes

    def describe(self) -> dict:
        d = asdict(self)
        d.update(bytes_per_expert=self.bytes_per_expert, dense_bytes=self.dense_bytes,
                 expert_bytes_total=self.expert_bytes_total, kv_bytes_per_token=self.kv_bytes_per_token,
                 total_params=self.total_params)
        return d


# Figures are the published config.json of each checkpoint (source named per preset).
PRESETS: dict[str, ModelSpec] = {
    m.name: m for m in [
        ModelSpec("mixtral-8x7b", hidden=4096, expert_ffn=14336, n_layers=32, n_moe_layers=32,
                  n_experts=8, top_k=2, n_heads=32, n_kv_heads=8, vocab=32000,
                  source="mistralai/Mixtral-8x7B-v0.1 config.json"),
        ModelSpec("mixtral-8x22b", hidden=6144, expert_ffn=16384, n_layers=56, n_moe_layers=56,
                  n_experts=8, top_k=2, n_heads=48, n_kv_heads=8, vocab=32768,
                  source="mistralai/Mixtral-8x22B-v0.1 config.json"),
        ModelSpec("olmoe-1b-7b", hidden=2048, expert_ffn=1024, n_layers=16, n_moe_layers=16,
                  n_experts=64, top_k=8, n_heads=16, n_kv_heads=16, vocab=50304,
                  source="allenai/OLMoE-1B-7B-0924 config.json"),
        # One shared expert of intermediate 5632 (= 4 x 1408) beside 60 routed experts.
        ModelSpec("qwen1.5-moe-a2.7b", hidden=2048, expert_ffn=1408, n_layers=24, n_moe_layers=24,
                  n_experts=60, top_k=4, n_heads=16, n_kv_heads=16, vocab=151936,
                  n_shared_experts=1, shared_ffn=5632,
                  source="Qwen/Qwen1.5-MoE-A2.7B config.json"),
        ModelSpec("qwen3-30b-a3b", hidden=2048, expert_ffn=768, n_layers=48, n_moe_layers=48,
                  n_experts=128, top_k=8, n_heads=32, n_kv_heads=4, head_dim=128, vocab=151936,
                  source="Qwen/Qwen3-30B-A3B config.json"),
        # MLA: the cache holds kv_lora_rank 512 + qk_rope_head_dim 64 per layer per token.
        # Attention params: q_proj 2048x16x192, kv_a 2048x576, kv_b 512x16x256, o 16x128x2048.
        # First layer is dense (first_k_dense_replace=1, intermediate 10944).
        ModelSpec("deepseek-v2-lite", hidden=2048, expert_ffn=1408, n_layers=27, n_moe_layers=26,
                  n_experts=64, top_k=6, n_heads=16, n_kv_heads=16, head_dim=128, vocab=102400,
                  n_shared_experts=2, dense_ffn=10944, kv_cache_dim=576,
                  attn_params=2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048,
                  source="deepseek-ai/DeepSeek-V2-Lite config.json"),
        # Small enough for unit tests and CPU replay.
        ModelSpec("tiny", hidden=64, expert_ffn=128, n_layers=4, n_moe_layers=4, n_experts=8,
                  top_k=2, n_heads=4, n_kv_heads=2, vocab=256, source="project test model"),
    ]
}

SPEC_FIELDS = {f.name for f in fields(ModelSpec)}
REQUIRED_FIELDS = {f.name for f in fields(ModelSpec) if f.default is MISSING}


def get_model(name_or_dict) -> ModelSpec:
    """A preset by name, or an explicit spec from a dict (optionally `preset:` + overrides)."""
    if isinstance(name_or_dict, ModelSpec):
        return name_or_dict
    if isinstance(name_or_dict, str):
        if name_or_dict not in PRESETS:
            raise KeyError(f"unknown model preset '{name_or_dict}'; choose one of: {', '.join(PRESETS)}"
                           " or give explicit dimensions")
        return PRESETS[name_or_dict]
    if isinstance(name_or_dict, dict):
        d = dict(name_or_dict)
        base = {}
        if "preset" in d:
            base = asdict(get_model(d.pop("preset")))
        unknown = set(d) - SPEC_FIELDS
        if unknown:
            raise KeyError(f"unknown model key(s) {sorted(unknown)}; allowed: {sorted(SPEC_FIELDS)}")
        base.update(d)
        base.setdefault("name", "custom")
        missing = REQUIRED_FIELDS - set(base)
        if missing:
            raise KeyError(f"model is missing required key(s) {sorted(missing)}")
        return ModelSpec(**base)
    raise TypeError(f"model must be a preset name or a mapping, got {type(name_or_dict).__name__}")

