"""Train the project's small MoE (a standard Hugging Face Mixtral) on a task mix, on a CPU.

    python traces/train_small_moe.py [--data ../shared/data/corpora] [--minutes 25] [-o traces/models/emoe-small-moe]

Weights cannot be downloaded here, so the project trains its own MoE to exercise,
for real, what a user does with Mixtral or OLMoE: capture routing, restrict the
experts, measure quality. Data: the corpora in ../shared/data (math, code, QA,
summarisation, translation, general web/scientific/code text), formatted with the
same templates as the prompt sets (traces/prompts.py). The last 10% of every source
is held out: the held-out perplexity and the prompt sets come from it. Writes the
checkpoint and tokenizer with save_pretrained, a loss curve and a model card.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from traces.prompts import load_task_examples

SOURCES = ["math", "code", "qa", "summarization", "translation", "general"]


def build_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main(argv=None):
    ap = argparse.ArgumentParser()
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--data", default=str(repo.parent / "shared" / "data" / "corpora"))
    ap.add_argument("-o", "--output", default=str(Path(__file__).resolve().parent / "models" / "emoe-small-moe"))
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    # Here, not at the top: `traces` imports without torch (tests/test_layering.py).
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    t_start = time.time()

    train_docs, held_docs = [], []
    counts = {}
    for task in SOURCES:
        ex = load_task_examples(task, a.data)
        cut = int(len(ex) * 0.9)
        train_docs += [e["prompt"] + e["reference"] for e in ex[:cut]]
        held_docs += [e["prompt"] + e["reference"] for e in ex[cut:]]
        counts[task] = (cut, len(ex) - cut)
    random.shuffle(train_docs)
    tok = build_tokenizer(train_docs, a.vocab)
    eos = tok.eos_token_id

    def encode(docs):
        ids = []
        for d in docs:
            ids.extend(tok(d)["input_ids"] + [eos])
        return torch.tensor(ids, dtype=torch.long)
    train_ids, held_ids = encode(train_docs), encode(held_docs)

    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=448, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=a.seq, tie_word_embeddings=True, router_aux_loss_coef=0.02,
                        output_router_logits=True, bos_token_id=tok.bos_token_id, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id, rope_theta=10000.0)
    model = MixtralForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.05)
    budget = a.minutes * 60
    log = []
    step = 0
    t0 = time.time()
    n_windows = len(train_ids) // a.seq - 1
    est_steps = None
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed > budget:
            break
        if step == 20:
            est_steps = int(budget / (elapsed / 20))
        total = est_steps or 10_000
        lr = 1.5e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_windows, (a.batch,)) * a.seq
        x = torch.stack([train_ids[s:s + a.seq] for s in starts])
        out = model(input_ids=x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = float((out.loss - cfg.router_aux_loss_coef * out.aux_loss).detach()) if out.aux_loss is not None \
            else float(out.loss.detach())
        log.append((step, time.time() - t0, lm))
        if step % 50 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {lm:.3f} lr {lr:.2e}", flush=True)
        step += 1
    train_s = time.time() - t0

    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(held_ids) - a.seq, a.seq):
            x = held_ids[s:s + a.seq].unsqueeze(0)
            out = model(input_ids=x, labels=x)
            nll += float(out.loss) * (a.seq - 1)
            n += a.seq - 1
    ppl = math.exp(nll / n)
    # Unigram baseline: token frequencies of the training data (add-one smoothing).
    freq = np.bincount(train_ids.numpy(), minlength=len(tok)) + 1
    logp = np.log(freq / freq.sum())
    uni = math.exp(-float(logp[held_ids.numpy()].mean()))

    out_dir = Path(a.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    steps_arr = np.array(log)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 20
    ax.plot(steps_arr[:, 0], steps_arr[:, 2], alpha=0.3, label="training loss")
    if len(steps_arr) > w:
        smooth = np.convolve(steps_arr[:, 2], np.ones(w) / w, mode="valid")
        ax.plot(steps_arr[w - 1:, 0], smooth, label=f"mean of {w}")
    ax.axhline(math.log(ppl), color="k", ls="--", label=f"held-out ({math.log(ppl):.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out_dir / "loss_curve.png", dpi=110, bbox_inches="tight")
    stats = dict(parameters=n_params, steps=step, tokens_seen=step * a.batch * a.seq, train_seconds=round(train_s),
                 total_seconds=round(time.time() - t_start), heldout_perplexity=round(ppl, 2),
                 unigram_perplexity=round(uni, 1), train_tokens=len(train_ids), heldout_tokens=len(held_ids),
                 documents=counts, torch=str(torch.__version__), seed=a.seed)
    (out_dir / "training.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
