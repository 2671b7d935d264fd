"""Replay against forgetting: general samples mixed into the fine-tuning data (`data.replay`).

Contract:
- `open_replay(data_cfg, tokenizer, cache_dir)` → a `Source` (`data/sources.py`) of the replay
  records. `data.replay_source` is opened like a `data.train` entry (any file type or folder it
  accepts; chat, alpaca … detected per source). `self` (self-distillation) reads the base model's
  own answers to the bundled prompts (`resources/replay/prompts.jsonl`), cached as JSON at
  `self_answers_path`; they are written by `tunesmith.infer.replay.prepare_replay`, which every
  training entry point calls first (the data layer cannot generate: it sits below `infer`). A
  missing answers file is a `UserError` naming the way to make it.
- `replay_samples(data_cfg, tokenizer, source, n_train, seed, stats)` → the replay `Sample`s to
  append to the training samples: n = round(f / (1 - f) · n_train) of them for `data.replay = f`,
  so they are the fraction f of the training samples. They are drawn from the tokenised pool in
  seeded shuffled passes (repeating samples when the pool is smaller than n), tokenised like
  training samples (loss on the answers), so packing, the row order and resume treat them like any
  sample: the result is a pure function of (pool, n_train, seed). `stats.n_replay` counts them and
  their tokens join `stats.n_tokens` / `n_label_tokens`. A pool with no usable sample is a `UserError`.
- The self answers' key (`self_answers_path`) covers the model (its directory's files' names,
  sizes and mtimes), the prompts' bytes, the generation settings, the chat template and the
  system prompt; the file is JSON written atomically (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.sft import DataStats, Sample, _tokenize_all
from tunesmith.data.sources import Source, open_source
from tunesmith.errors import UserError
from tunesmith.io import write_atomic

# ., ! or ? after a word (not "2." of a numbered list), then closing quotes/brackets, then a space
SENTENCE_END = re.compile(r"(?<![\d\s])[.!?][\"')\]]*(?=\s)")
PROMPTS = Path(__file__).resolve().parents[1] / "resources" / "replay" / "prompts.jsonl"
# how the base model answers the prompts: greedy, fp32, 32 answers in flight (fuller batches decode faster)
GENERATION = {"max_new_tokens": 128, "batch_size": 32, "greedy": True, "dtype": "fp32", "version": 3}


def data_cache_dir(data_cfg: DataConfig) -> Path:
    from tunesmith.models import tunesmith_home

    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else tunesmith_home() / "data-cache"


def load_prompts() -> list[str]:
    text = PROMPTS.read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def prompt_conversation(prompt: str, system_prompt: str | None) -> list[dict]:
    """A prompt as training renders it: the run's system prompt (when set) before the user turn."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return head + [{"role": "user", "content": prompt}]


def self_answers_path(data_cfg: DataConfig, tokenizer, cache_dir: Path) -> Path:
    template = tokenizer.chat_template
    key = {
        "model": _model_fingerprint(getattr(tokenizer, "name_or_path", "") or ""),
        "prompts": hashlib.sha256(PROMPTS.read_bytes()).hexdigest(),
        "generation": GENERATION,
        "template": template if isinstance(template, str) else json.dumps(template, sort_keys=True),
        "system_prompt": data_cfg.system_prompt,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"replay-self-{digest}.json"


def write_answers(path: Path, prompts: list[str], answers: list[str], model: str, finished=None) -> int:
    """The self-distilled pool, as `messages` records; returns how many. An answer cut off at
    `max_new_tokens` (`finished[i]` false) is kept up to its last whole sentence: followed by the
    end-of-turn token, a cut-off one would teach the model to stop mid-sentence. Empty ones teach
    nothing and are left out."""
    finished = finished if finished is not None else [True] * len(answers)
    kept = [(p, a if done else whole_sentences(a)) for p, a, done in zip(prompts, answers, finished)]
    records = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in kept
        if a.strip()
    ]
    body = {"model": model, "generation": GENERATION, "prompts": len(prompts), "records": records}
    write_atomic(path, json.dumps(body, ensure_ascii=False, indent=1))
    return len(records)


def whole_sentences(text: str) -> str:
    """`text` up to the end of its last whole sentence (., ! or ? then a space or line break); "" if none."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else ""


def read_answers(path: Path) -> list[dict] | None:
    """The records of a self answers file; None when it is missing or damaged (then it is regenerated)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))["records"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return records if isinstance(records, list) else None


def open_replay(data_cfg: DataConfig, tokenizer, cache_dir: Path | None) -> Source:
    if data_cfg.replay_source != "self":
        return open_source(data_cfg.replay_source, "train", None)
    path = self_answers_path(data_cfg, tokenizer, Path(cache_dir) if cache_dir else data_cache_dir(data_cfg))
    records = read_answers(path)
    if records is None:
        raise UserError(
            "config key data.replay_source: self needs the base model's answers to the replay prompts, not yet in "
            f"{path.parent}; tunesmith train, quickstart, compare and pipeline make them before training "
            "(library: tunesmith.infer.replay.prepare_replay(cfg))"
        )
    if not records:
        raise UserError(
            f"config key data.replay_source: the base model (answers in {path}) answered none of the replay prompts "
            "(every answer empty or cut off); give a replay data file instead of self"
        )
    name = f"{path} (the base model's answers)"
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()
    return Source(
        name, "self", lambda: fingerprint, lambda: ((f"{name}:row {i}", r, "json") for i, r in enumerate(records, 1))
    )


def replay_samples(
    data_cfg: DataConfig, tokenizer, source: Source, n_train: int, seed: int, stats: DataStats
) -> list[Sample]:
    from tunesmith.data.formats import source_examples

    fraction = data_cfg.replay or 0.0
    n = round(fraction / (1.0 - fraction) * n_train)
    examples = source_examples(source, "auto", data_cfg.system_prompt, None)  # an empty source: UserError
    if n == 0:
        return []
    pool_stats = DataStats()
    pool = _tokenize_all(tokenizer, examples, data_cfg, pool_stats)
    if not pool:
        raise UserError(
            f"{source.name}: no replay samples left: all {len(examples)} dropped (longer than "
            f"data.max_length={data_cfg.max_length} with data.overlong={data_cfg.overlong}, or nothing to learn)"
        )
    rng = random.Random(seed * 1_000_003 + 7919)  # its own stream: the task data's split is unchanged
    order: list[int] = []
    while len(order) < n:  # whole shuffled passes: every pool sample once before any repeats
        one_pass = list(range(len(pool)))
        rng.shuffle(one_pass)
        order += one_pass
    drawn = [pool[i] for i in order[:n]]
    stats.n_replay = len(drawn)
    stats.n_tokens += sum(len(s.input_ids) for s in drawn)
    stats.n_label_tokens += sum(label != -100 for s in drawn for label in s.labels)
    return drawn


def _model_fingerprint(name: str) -> str:
    """A model directory's files' names, sizes and mtimes (a re-downloaded or changed model regenerates);
    a file (GGUF) likewise; anything else (a hub id) by its name."""
    p = Path(name)
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else []
    if p.is_file():
        files = [p]
    if not files:
        return name
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()
