"""Training on retrieved context (`data.context`, RAFT: Zhang et al. 2024), and the RAG prompt itself.

Contract:
- `RAG_INSTRUCTION` and `rag_message(question, chunks)` are the user turn of `tunesmith compare`'s RAG
  arms (`eval/arms.py` imports them from here): the instruction, the numbered chunks, the question.
  Training with context writes the very same text, so a fine-tuned model learns to read the context
  exactly as the `finetuned_rag` arm will show it.
- `documents_folder(data, compare)` is `data.documents`, else `compare.documents` (a `UserError`
  when neither is set or the folder is missing); `documents_fingerprint(...)` covers its files' names,
  sizes and mtimes plus the retriever settings, for the tokenised-data cache key.
- `context_line(stats, documents, max_length)` says what `add_context` did, in one line.
- `context_samples(examples, data, compare, seed, tokenize, stats)`: `build_datasets`' step, the
  tokenised copies plus their stats (`DataStats.context`); `context_check(paths, cfg, tokenizer,
  max_length)` the same stats for `tunesmith data check --config`.
- `add_context(examples, data, compare, seed)` → `(examples, ContextStats)`: for a seeded
  `data.context_fraction` of the conversations whose last user message is answered by an assistant
  message, a copy whose last user message is `rag_message(question, chunks)`, appended after the
  plain examples (the plain ones always stay, so the `finetuned` arm without context still works).
  The k chunks (`compare.top_k`, `compare.retriever`, `compare.chunk_size`/`chunk_overlap`) are the
  retriever's top-k for the question, as the arm gets them. The oracle chunks are those holding the
  answer: its whole text (case-insensitive), else the most of its rare words (in at most 5% of the
  chunks) that the question lacks; none when the answer has no such word. A top-k without one gets
  the best-ranked oracle chunk in place of its last chunk, at a seeded position. A seeded
  `data.context_distractor_only` fraction of the copies has every oracle chunk removed, the
  next-ranked chunks filling in (distractors only: the model must also answer from what it learnt).
  A seeded `data.context_counterfactual` share of the other copies, those whose shown oracle chunk
  holds the answer's name or number (`data.counterfactual.answer_span`), has that answer replaced by
  another conversation's of the same kind in the chunks and in the reply (the model must read).
  Deterministic for a given seed, examples, documents and settings.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tunesmith.data.counterfactual import answer_span, pick_substitute, swap
from tunesmith.errors import UserError

RAG_INSTRUCTION = "Answer the question using the context below. Give the exact name, number or term."
WORD = re.compile(r"\w+")
EXTRA_RANKS = 32  # ranked past top_k, to refill a top-k whose oracle chunks are removed


def rag_message(question: str, chunks: list[str]) -> str:
    context = "\n".join(f"[{i}] {c}" for i, c in enumerate(chunks, 1))
    return f"{RAG_INSTRUCTION}\n\nContext:\n{context}\n\nQuestion: {question}"


@dataclass
class ContextStats:
    n_context: int = 0  # copies rendered with context
    n_oracle_found: int = 0  # of those, questions whose answer some chunk holds
    n_oracle_retrieved: int = 0  # ... and the retriever's top-k already held one
    n_distractor_only: int = 0  # copies whose chunks exclude every oracle chunk
    n_counterfactual: int = 0  # copies whose answer is swapped for another's, in chunks and reply
    n_chunks: int = 0  # in the documents


def context_line(stats: dict, documents, max_length: int) -> str:
    """One line for the training banner and `data check`: how many copies got context, and how often
    the answer's chunk was found (and already in the retriever's top-k)."""
    n, found = stats["n_context"], stats["n_oracle_found"]
    return (
        f"tunesmith: data.context: {n} conversations also trained with retrieved chunks of {documents} "
        f"({stats['n_chunks']} chunks); answer's chunk found for {found} ({found / max(1, n):.0%}), "
        f"in the retriever's top-k for {stats['n_oracle_retrieved']}; "
        f"{stats['n_distractor_only']} with distractors only"
        + (f", {stats['n_counterfactual']} with the answer swapped" if stats.get("n_counterfactual") else "")
        + (
            f"; {stats['n_cut']} longer than data.max_length={max_length} (truncated or dropped): raise it"
            if stats.get("n_cut")
            else ""
        )
    )


def documents_folder(data, compare) -> Path:
    key = "data.documents" if data.documents else "compare.documents"
    folder = data.documents or compare.documents
    if not folder:
        raise UserError("config key data.documents: data.context needs a documents folder (or compare.documents)")
    if not Path(folder).is_dir():
        raise UserError(f"config key {key}: {folder} is not a folder")
    return Path(folder)


def documents_fingerprint(data, compare) -> str:
    """What the retrieved context depends on: the documents' files and the retrieval settings."""
    from tunesmith.data.retrieval import DOC_SUFFIXES

    root = documents_folder(data, compare)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    parts = [f"{p.relative_to(root)}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}" for p in files]
    settings = (
        compare.retriever,
        compare.top_k,
        compare.chunk_size,
        compare.chunk_overlap,
        data.context_fraction,
        data.context_distractor_only,
        data.context_counterfactual,
    )
    return f"{root.resolve()}\0{settings}\0" + "\0".join(parts)


def add_context(examples: list, data, compare, seed: int) -> tuple[list, ContextStats]:
    from tunesmith.data.retrieval import load_chunks, make_retriever

    root = documents_folder(data, compare)
    key = "data.documents" if data.documents else "compare.documents"
    chunks = load_chunks(root, compare.chunk_size, compare.chunk_overlap, key=key)
    stats = ContextStats(n_chunks=len(chunks))
    eligible = [(i, qa) for i, ex in enumerate(examples) if (qa := _last_exchange(ex)) is not None]
    rng = random.Random(f"data.context:{seed}")
    n_pick = round(len(eligible) * data.context_fraction)
    picked = sorted(rng.sample(range(len(eligible)), n_pick))
    if not picked:
        return examples, stats
    n_without = round(n_pick * data.context_distractor_only)
    without = set(rng.sample(picked, n_without))
    questions = [eligible[j][1][2] for j in picked]
    depth = min(len(chunks), compare.top_k + EXTRA_RANKS)
    ranked = make_retriever(compare.retriever, chunks)(questions, depth)
    words = [set(WORD.findall(c.text.lower())) for c in chunks]
    lowered = [c.text.lower() for c in chunks]
    df = Counter(w for have in words for w in have)
    copies = []
    for j, ranking in zip(picked, ranked):
        i, (u, a, question, answer) = eligible[j]
        oracle = _oracle(question, answer, lowered, words, df)
        chosen = _choose(ranking, oracle, compare.top_k, j in without, rng, stats)
        copies.append((i, u, a, question, answer, [chunks[c].text for c in chosen], oracle & set(chosen)))
    if data.context_counterfactual:
        copies = _counterfactual(copies, eligible, data.context_counterfactual, lowered, df, seed, stats)
    out = list(examples)
    for i, u, a, question, answer, texts, _ in copies:
        messages = [dict(m) for m in examples[i].messages]
        messages[u] = {**messages[u], "content": rag_message(question, texts)}
        messages[a] = {**messages[a], "content": answer}
        out.append(replace(examples[i], messages=messages, where=f"{examples[i].where} (with context)"))
        stats.n_context += 1
    return out, stats


def _counterfactual(copies: list, eligible: list, share: float, lowered: list, df: dict, seed: int, stats) -> list:
    """A seeded `share` of the copies shown an answer's chunk get another conversation's answer of the
    same kind in place of theirs, in the chunks and in the reply (`data.context_counterfactual`)."""
    rare_at = _rare_at(len(lowered))
    pool = []
    for _, (_, _, question, answer) in eligible:
        span = answer_span(question, answer, lowered, df, rare_at)
        if span:
            pool.append(answer[slice(*span)])
    spans = {}
    for n, (_, _, _, question, answer, _, shown) in enumerate(copies):
        span = answer_span(question, answer, [lowered[c] for c in sorted(shown)], df, rare_at)
        if span:
            spans[n] = span
    rng = random.Random(f"data.context_counterfactual:{seed}")
    out = list(copies)
    for n in sorted(rng.sample(sorted(spans), round(len(spans) * share))):
        i, u, a, question, answer, texts, shown = copies[n]
        new = pick_substitute(answer[slice(*spans[n])], pool, rng)
        if new is not None:
            texts, answer = swap(texts, answer, spans[n], new)
            out[n] = (i, u, a, question, answer, texts, shown)
            stats.n_counterfactual += 1
    return out


def context_samples(examples: list, data, compare, seed: int, tokenize, stats) -> list:
    """The tokenised copies with context (`tokenize`: examples → samples, counting into the DataStats
    `stats`); `stats.context` gets the ContextStats plus `n_cut`, the copies max_length truncated or dropped."""
    out, context = add_context(examples, data, compare, seed)
    before = stats.n_truncated + stats.n_dropped
    samples = tokenize(out[len(examples) :])
    stats.context = {**asdict(context), "n_cut": stats.n_truncated + stats.n_dropped - before}
    return samples


def context_check(paths, cfg, tokenizer, max_length: int) -> dict:
    """`tunesmith data check --config` with `data.context` on: what training would do to `paths`."""
    from tunesmith.data.formats import load_examples
    from tunesmith.data.sft import DataStats, _tokenize_all

    d = replace(cfg.data, max_length=max_length)
    examples = load_examples(list(paths), d.format, d.system_prompt, d.split, d.subset, d.columns)
    stats = DataStats()
    context_samples(
        examples, d, cfg.compare, cfg.train.seed, lambda exs: _tokenize_all(tokenizer, exs, d, stats), stats
    )
    return stats.context


def _last_exchange(ex) -> tuple[int, int, str, str] | None:
    """(user index, assistant index, question, answer): the last user message and the assistant
    message that follows it, if both are plain text."""
    messages = ex.messages
    if not messages:
        return None
    users = [k for k, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return None
    u = users[-1]
    after = [k for k in range(u + 1, len(messages)) if messages[k].get("role") == "assistant"]
    if not after or not isinstance(messages[u].get("content"), str):
        return None
    a = after[0]
    answer = messages[a].get("content")
    if not isinstance(answer, str) or not answer.strip() or messages[a].get("tool_calls"):
        return None
    return u, a, messages[u]["content"], answer


def _oracle(question: str, answer: str, lowered: list[str], words: list[set[str]], df: dict) -> set[int]:
    whole = answer.strip().rstrip(".!").strip().lower()
    found = {c for c, text in enumerate(lowered) if whole and whole in text}
    if found:
        return found
    rare_at = _rare_at(len(words))
    new = set(WORD.findall(answer.lower())) - set(WORD.findall(question.lower()))
    rare = {w for w in new if 0 < df.get(w, 0) <= rare_at}
    if not rare:
        return set()
    score = [len(rare & have) for have in words]
    return {c for c, s in enumerate(score) if s == max(score)}


def _rare_at(n_chunks: int) -> int:
    """How many chunks a rare word is in at most: a word in at most 5% of them names something."""
    return max(2, n_chunks // 20)


def _choose(ranking: list[int], oracle: set[int], k: int, without: bool, rng, stats: ContextStats) -> list[int]:
    top = ranking[:k]
    if oracle:
        stats.n_oracle_found += 1
        stats.n_oracle_retrieved += any(c in oracle for c in top)
    if without:
        stats.n_distractor_only += 1
        return [c for c in ranking if c not in oracle][:k]
    if not oracle or any(c in oracle for c in top):
        return top
    best = next((c for c in ranking if c in oracle), min(oracle))
    rest = top[: k - 1]
    rest.insert(rng.randrange(len(rest) + 1), best)
    return rest
