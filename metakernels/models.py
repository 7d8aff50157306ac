"""Tiny model configurations built without any download (the default run, tests, benchmarks)."""
from __future__ import annotations

import torch


def tiny_config(family: str = "llama", vocab_size: int = 128, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int | None = None,
                intermediate_size: int | None = None, max_position_embeddings: int = 256,
                attn_implementation: str = "sdpa", initializer_range: float = 0.02):
    """A ``transformers`` config of a small model of ``family`` (llama, qwen2, mistral, gpt2)."""
    import transformers as tf

    inter = intermediate_size or 4 * hidden_size
    kv = num_kv_heads or num_heads
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=kv, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=False, initializer_range=initializer_range)
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                            n_head=num_heads, n_positions=max_position_embeddings,
                            n_inner=inter, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            initializer_range=initializer_range)
    else:
        raise ValueError(f"unknown model family {family!r}; choose llama, qwen2, mistral or gpt2")
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    """A randomly initialised causal LM from ``tiny_config`` (eval mode, frozen by inject)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation)
    return model.to(dtype).eval()
