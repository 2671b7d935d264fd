"""From-scratch model sizes: a preset name (or explicit dimensions) → a `LlamaConfig`.

Contract: `model_config(pretrain_cfg, vocab_size, tokenizer)` returns a Llama config whose
non-zero `pretrain.hidden_size/layers/heads/intermediate_size` override the preset's; the
special-token ids come from the tokenizer, embeddings are tied (at these sizes the embedding
matrix is a large share of the parameters). `count_params(config)` is the exact parameter
count `LlamaForCausalLM(config)` will have, without building it.

Sizes at vocab 4096: tiny ≈ 1.3M, small ≈ 9.4M, base ≈ 50M parameters.
"""

from __future__ import annotations

from tunesmith.errors import UserError

# name → (hidden_size, layers, heads, intermediate_size)
PRESETS = {
    "tiny": (128, 4, 4, 320),
    "small": (256, 8, 8, 1024),
    "base": (512, 14, 8, 1536),
}


def dimensions(p) -> tuple[int, int, int, int]:
    hidden, layers, heads, inter = PRESETS[p.preset]
    hidden = p.hidden_size or hidden
    layers = p.layers or layers
    heads = p.heads or heads
    inter = p.intermediate_size or inter
    if hidden % heads:
        raise UserError(f"config key pretrain.heads: {heads} heads do not divide hidden size {hidden}")
    if (hidden // heads) % 2:
        raise UserError(f"config key pretrain.heads: head size {hidden // heads} must be even (rotary embeddings)")
    return hidden, layers, heads, inter


def model_config(p, vocab_size: int, tokenizer, max_positions: int):
    from transformers import LlamaConfig

    hidden, layers, heads, inter = dimensions(p)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def count_params(config) -> int:
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q,o + k,v + gate/up/down + 2 norms
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + n * per_layer + h + head
