"""The chat data of `bench/train_throughput.py`: 400 training and 100 validation conversations of
60–170 tokens (SmolLM2's chat template, its default system prompt included), built from the bundled
quickstart questions so the benchmark needs no download.

    build(out_dir, tokenizer, seed) → {"train": path, "validation": path, "trl_train": path, ...}
    build(out_dir, tokenizer, long=True): `--users`' long-samples set, 100 training and 20 validation
        conversations of 1,500–2,000 tokens (dozens of questions in one turn), for max length 2048

Each conversation is one user turn of 1–6 quickstart questions and one assistant turn with their
answers, sized to a length drawn uniformly from [60, 170] tokens. Training conversations use the
questions of the first 80 quickstart facts, validation ones those of the last 20, so validation
loss is never measured on trained text. Two copies of the training set are written: `train.jsonl` in file order
for tunesmith, and `trl_train.jsonl` (prompt/completion format) in the order tunesmith's loop visits
the rows (`randperm(seed)`), which TRL reads with its sequential sampler — so step for step both
tools train on the same samples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

QUICKSTART = Path(__file__).resolve().parents[1] / "tunesmith" / "resources" / "quickstart"
MIN_TOKENS, MAX_TOKENS = 60, 170
LONG_TOKENS = (1500, 2000)  # build(long=True)


def _pairs(held_out: bool) -> list[tuple[str, str]]:
    """Question/answer pairs of the first 80 facts (training) or of the last 20 (validation)."""
    out = []
    for line in (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if (int(row["fact_id"][1:]) > 80) == held_out:
            out.append((row["messages"][0]["content"], row["messages"][1]["content"]))
    return out


def _length(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def _conversations(pairs, n, tokenizer, rng, lo=MIN_TOKENS, hi=MAX_TOKENS) -> list[list[dict]]:
    convs = []
    # A pair is ~25 tokens; a long conversation needs more pairs than the 60 validation ones, so
    # those draw with repeats (validation text is still never trained on).
    per_conversation = max(8, hi // 10)
    while len(convs) < n:
        target = rng.randint(lo, hi)
        qs, ans, best = [], [], None
        drawn = (
            rng.sample(pairs, per_conversation)
            if per_conversation <= len(pairs)
            else rng.choices(pairs, k=per_conversation)
        )
        for q, a in drawn:
            qs.append(q)
            ans.append(a)
            msgs = [{"role": "user", "content": " ".join(qs)}, {"role": "assistant", "content": " ".join(ans)}]
            length = _length(tokenizer, msgs)
            if length > hi:
                break
            best = (msgs, length)
            if length >= target:
                break
        if best is not None and best[1] >= lo:
            convs.append(best[0])
    return convs


def build(out_dir: Path, tokenizer, seed: int = 0, n_train: int = 400, n_val: int = 100, long: bool = False) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lo, hi = LONG_TOKENS if long else (MIN_TOKENS, MAX_TOKENS)
    if long:
        n_train, n_val = min(n_train, 100), min(n_val, 20)  # 20 steps of batch 4 read 80
    train = _conversations(_pairs(False), n_train, tokenizer, rng, lo, hi)
    val = _conversations(_pairs(True), n_val, tokenizer, rng, lo, hi)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    paths = {k: out_dir / f"{k}.jsonl" for k in ("train", "validation", "trl_train")}
    _write(paths["train"], ({"messages": m} for m in train))
    _write(paths["validation"], ({"messages": m} for m in val))
    _write(paths["trl_train"], ({"prompt": train[i][:1], "completion": train[i][1:]} for i in order))
    lengths = [_length(tokenizer, m) for m in train]
    return {
        **{k: str(v) for k, v in paths.items()},
        "train_tokens": sum(lengths),
        "min_len": min(lengths),
        "max_len": max(lengths),
        "mean_len": sum(lengths) / len(lengths),
    }


def _write(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
