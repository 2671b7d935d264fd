"""The five arms of `tunesmith compare` and the prompt each one sends.

Contract:
- `ARMS[name]` holds a label and a one-line description for tables and the report.
- `uses_finetuned(arm)` / `uses_context(arm)` say which weights and whether retrieved chunks go in.
- `few_shot(examples, k, seed)` draws k single-turn (user, assistant) pairs from the training
  examples with a fixed seed: the prompt-engineering arm's worked examples.
- `conversation(arm, question, ...)` builds the chat messages. Every arm answers the same
  question text through the same chat template and decoding; only what surrounds the question
  differs: nothing (base, fine-tuned), an instruction and worked examples (prompt), or the
  retrieved chunks (RAG arms: `rag_message`, from `data/context.py`, which training with
  `data.context` writes too).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunesmith.data.context import RAG_INSTRUCTION as RAG_INSTRUCTION  # shared with training on context
from tunesmith.data.context import rag_message


@dataclass(frozen=True)
class Arm:
    label: str
    description: str


ARMS = {
    "base": Arm("Base model, zero-shot", "the base model alone, with the run's system prompt"),
    "prompt": Arm(
        "Prompt engineering", "the base model with an instruction and k worked examples from the training data"
    ),
    "rag": Arm("RAG", "the base model with the top-k retrieved document chunks in the prompt"),
    "finetuned": Arm("Fine-tuned", "the fine-tuned model alone, with the run's system prompt"),
    "finetuned_rag": Arm("Fine-tuned + RAG", "the fine-tuned model with the top-k retrieved chunks in the prompt"),
}


def uses_finetuned(arm: str) -> bool:
    return arm.startswith("finetuned")


def uses_context(arm: str) -> bool:
    return arm.endswith("rag")


def few_shot(examples, k: int, seed: int) -> list[tuple[str, str]]:
    pairs = []
    for ex in examples:
        turns = [m for m in (ex.messages or []) if m["role"] != "system"]
        if len(turns) == 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant":
            pairs.append((turns[0]["content"], turns[1]["content"]))
    rng = random.Random(seed)
    return rng.sample(pairs, min(k, len(pairs)))


def conversation(
    arm: str,
    question: str,
    system: str | None,
    prompt_system: str,
    shots: list[tuple[str, str]],
    chunks: list[str] | None = None,
) -> list[dict]:
    if arm == "prompt":
        messages = [{"role": "system", "content": prompt_system}]
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": question}]
    messages = [{"role": "system", "content": system}] if system else []
    content = rag_message(question, chunks or []) if uses_context(arm) else question
    return messages + [{"role": "user", "content": content}]
