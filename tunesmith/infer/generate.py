"""Chat-formatted generation: batched with a KV cache, or streamed token by token.

Contract:
- `render_prompt(tokenizer, messages)` applies the chat template with the assistant turn
  opened, exactly as training rendered conversations (same template, same system prompt).
- `generate_batch(model, tokenizer, conversations, ...)` returns one completion per
  conversation, decoded without special tokens. Prompts are left-padded into batches
  sorted by length (less padding), generation uses the model's KV cache and stops at the
  tokenizer's EOS / end-of-turn token. Greedy unless `temperature > 0`.
- `generate_detailed(...)` is the same, and also returns prompt and generated token counts;
  `on_batch(n)`, when given, is called after each batch with the number of answers it finished
  (progress bars).
- `stream_reply(...)` yields text pieces as they are produced, for `tunesmith chat`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch


def render_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def generate_batch(model, tokenizer, conversations: list[list[dict]], *args, **kwargs) -> list[str]:
    return generate_detailed(model, tokenizer, conversations, *args, **kwargs)[0]


@torch.no_grad()
def generate_detailed(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 0.95,
    on_batch=None,
) -> tuple[list[str], list[int], list[int]]:
    """Completions plus, per conversation, prompt tokens and generated tokens (up to the stop token)."""
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    generated = [0] * len(encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_ids(tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
            **_sampling(temperature, top_p),
        )
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            stop = next((n for n, t in enumerate(new) if t in eos), None)
            generated[i] = len(new) if stop is None else stop + 1  # the stop token is generated work too
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(idx))
    return outputs, [len(e) for e in encoded], generated


def stream_reply(
    model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95
) -> Iterator[str]:
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        input_ids=ids["input_ids"].to(device),
        attention_mask=ids["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **_sampling(temperature, top_p),
    )
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()
