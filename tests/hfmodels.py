"""Tiny random-initialised Hugging Face MoE models of each supported architecture."""
import pytest

transformers = pytest.importorskip("transformers")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Summarize the dialogue: hello there", "Solve the math problem: 3 + 4",
                             "def add(a, b): return a + b", "who wrote the odyssey"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, vocab: int):
    from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    if arch == "mixtral":
        return MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "olmoe":
        return OlmoeConfig(num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(num_key_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                              num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_key_value_heads=2, head_dim=8, moe_intermediate_size=32, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=True, **common)
    if arch == "deepseek_v3":
        return DeepseekV3Config(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8,
                                num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, n_group=2,
                                topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=8, **common)
    raise ValueError(arch)


def save_tiny(arch: str, path):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
