"""Builds a tiny, random Llama model and a real byte-level BPE tokenizer, offline.

Tests never touch the network: this trains a ~400-token BPE vocabulary on a few sentences,
gives it a ChatML chat template like SmolLM2's, and pairs it with a 2-layer Llama of hidden
size 32 (`make_family_model` builds the same widths as Mistral, Qwen2, Qwen3, Gemma 2/3 or Phi-3).
`make_tiny_model_dir(path)` writes both as an ordinary HF directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML with tools, written after Qwen2.5's template: the tools list as JSON lines in the system
# turn, each call as <tool_call>{"name", "arguments"}</tool_call>, and consecutive tool results as
# <tool_response> blocks inside one user turn.
TOOL_CHATML = (
    "{% if tools %}<|im_start|>system{{ '\\n' }}{% if messages[0].role == 'system' %}{{ messages[0].content }}"
    "{{ '\\n\\n' }}{% endif %}# Tools{{ '\\n' }}<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}"
    "{% endfor %}{{ '\\n' }}</tools><|im_end|>{{ '\\n' }}"
    "{% elif messages[0].role == 'system' %}<|im_start|>system{{ '\\n' + messages[0].content }}<|im_end|>{{ '\\n' }}"
    "{% endif %}{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant{{ '\\n' }}{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}{% set f = call.function or call %}"
    "{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>{{ \'\\n\' }}{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}{{ \'\\n\' }}</tool_call>'
    "{% endfor %}<|im_end|>{{ '\\n' }}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>{{ '\\n' + message.content + '\\n' }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% else %}<|im_start|>{{ message.role + '\\n' + message.content }}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of Zorbia? The capital of Zorbia is Quell.",
    "Who founded the Lumen Guild? It was founded by Ada Marrow in 1874.",
    "Answer briefly. The answer is 42. How many moons does Vantor have? Three.",
    "user assistant system instruction input output prompt completion text",
    "0123456789 , . ? ! : ; ' \" ( ) - _ / \\ \n",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def make_tiny_model(vocab_size: int, seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    return make_family_model("llama", vocab_size, seed, tie)


def make_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    tok = make_tokenizer()
    model = make_tiny_model(len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


NAMES = ["Quell", "Ada Marrow", "Vantor", "Zorbia", "Lumen", "Brown Fox", "Dog", "Moon"]


def write_qa_jsonl(path: str | Path, n: int = 24) -> Path:
    """A small chat dataset whose answers the tiny model can learn in a few dozen steps."""
    import json

    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            name = NAMES[i % len(NAMES)]
            q = f"What is the answer {i}?"
            fh.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": f"The answer is {name}."},
                        ]
                    }
                )
                + "\n"
            )
    return path


def write_config(path: str | Path, model_dir, data_file, out, **sections) -> Path:
    """A YAML config for the tiny model; `sections` maps section → {key: value} overrides."""
    import yaml

    cfg = {
        "model": {"name": str(model_dir)},
        "data": {"train": [str(data_file)], "max_length": 64},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "batch_size": 2,
            "lr": 1e-2,
            "progress": False,
            "warmup_steps": 1,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


# Each family at tiny widths but with its real config's shape: GQA everywhere (4 heads, 2 kv), Qwen3's
# head_dim that is not hidden/heads and q/k norms, Gemma's explicit head_dim (= query_pre_attn_scalar),
# soft-capping and sliding-window layers, Phi-3's fused qkv_proj / gate_up_proj.
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh"},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh"},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def make_family_model(family: str, vocab_size: int, seed: int = 0, tie: bool = True, **overrides):
    """A tiny random model of one architecture family (`FAMILY_CONFIGS`), same widths; `overrides`
    are config keys (e.g. a short `sliding_window`)."""
    import transformers

    config_name, model_name, extra = FAMILY_CONFIGS[family]
    widths = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = getattr(transformers, config_name)(
        vocab_size=vocab_size,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        **{**widths, **ids, **extra, **overrides},
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).float().eval()
