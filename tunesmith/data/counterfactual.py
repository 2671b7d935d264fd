"""Counterfactual context copies (`data.context_counterfactual`): the answer swapped in chunks and reply.

Contract:
- `answer_span(question, answer, texts, df, rare_at)` → `(start, end)` of the words in `answer` that
  name it, or None: the run of consecutive words (joined by a space, hyphen or apostrophe), each a
  number or capitalised (a sentence's first word only when rare) and absent from the question, with
  the most rare words (in at most `rare_at` chunks by the document frequencies `df`; at least one),
  then the longest, then the first, whose text one of `texts` (lower-cased chunk texts) holds as
  whole words.
- `kind(text)` → what a substitute must match: ("number", digits) or ("name", words).
- `pick_substitute(text, pool, rng)` → a text of `pool` (the spans of the other conversations'
  answers) of the same kind and a different lower-cased text, else None; seeded by `rng`.
- `swap(chunks, answer, span, new)` → the chunks with every whole-word, case-insensitive occurrence
  of the span's text replaced by `new` (and, for a name of several words cut by a chunk's edge, the
  words at that edge by the matching words of `new`), and the answer with its span replaced.

Why: a model fine-tuned on facts and then shown retrieved chunks answers from memory. On the
quickstart, given the chunk that names the harbour's dredger, it names a trained entity of another
fact instead. A copy whose chunks and reply both name another answer of the same kind can only be
answered by reading the chunks; training on some of them teaches the tuned model to follow its
context where context and memory disagree (substitution training: Longpre et al. 2021,
"Entity-Based Knowledge Conflicts in Question Answering").
"""

from __future__ import annotations

import re

WORD = re.compile(r"\w+")
JOINS = {" ", "-", "'"}


def _named(m: re.Match, answer: str, asked: set[str], common: bool) -> bool:
    """A word that can name the answer: a number, or capitalised — not just as a sentence's first word."""
    word = m.group()
    initial = not answer[: m.start()].rstrip(" \"'(") or answer[: m.start()].rstrip()[-1:] in ".!?:"
    return (word.isdigit() or (word[0].isupper() and not (initial and common))) and word.lower() not in asked


def _holds(text: str, lowered: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(text.lower())}(?!\w)", lowered) is not None


def answer_span(question: str, answer: str, texts: list[str], df: dict, rare_at: int) -> tuple[int, int] | None:
    asked = set(WORD.findall(question.lower()))
    runs, run = [], []
    for m in WORD.finditer(answer):
        named = _named(m, answer, asked, not 0 < df.get(m.group().lower(), 0) <= rare_at)
        if run and (not named or answer[run[-1].end() : m.start()] not in JOINS):
            runs.append(run)
            run = []
        if named:
            run.append(m)
    runs.append(run)
    best, best_key = None, None
    for run in filter(None, runs):
        rare = sum(0 < df.get(m.group().lower(), 0) <= rare_at for m in run)
        span = (run[0].start(), run[-1].end())
        key = (rare, span[1] - span[0], -span[0])
        if rare and (best_key is None or key > best_key) and any(_holds(answer[slice(*span)], t) for t in texts):
            best, best_key = span, key
    return best


def kind(text: str) -> tuple[str, int]:
    words = WORD.findall(text)
    if all(w.isdigit() for w in words):
        return "number", len(text)
    return "name", len(words)


def pick_substitute(text: str, pool: list[str], rng) -> str | None:
    want = kind(text)
    options = sorted({p for p in pool if kind(p) == want and p.lower() != text.lower()})
    return rng.choice(options) if options else None


def swap(chunks: list[str], answer: str, span: tuple[int, int], new: str) -> tuple[list[str], str]:
    text = answer[slice(*span)]
    old = re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)
    if answer[: span[0]].lower().endswith("the ") and new.lower().startswith("the "):
        new = new[4:]  # "the The Drowned Fiddler"
    chunks = [_edges(old.sub(lambda _: new, c), text, new) for c in chunks]
    return chunks, answer[: span[0]] + new + answer[span[1] :]


def _edges(chunk: str, text: str, new: str) -> str:
    """A chunk cut inside a name of several words ("… the Brisk" | "Water. The …") gets the matching
    words of `new` at that edge, so no word of the old answer is left to read."""
    olds, news = list(WORD.finditer(text)), list(WORD.finditer(new))
    n = len(olds)
    if n < 2 or n != len(news):
        return chunk
    for k in range(n - 1, 0, -1):  # the chunk ends with the name's first k words
        m = re.search(rf"(?<!\w){re.escape(text[: olds[k - 1].end()])}(?=\W*$)", chunk, re.IGNORECASE)
        if m:
            chunk = chunk[: m.start()] + new[: news[k - 1].end()] + chunk[m.end() :]
            break
    for k in range(n - 1, 0, -1):  # it starts with the name's last k words
        m = re.match(rf"\W*({re.escape(text[olds[n - k].start() :])})(?!\w)", chunk, re.IGNORECASE)
        if m:
            chunk = chunk[: m.start(1)] + new[news[n - k].start() :] + chunk[m.end(1) :]
            break
    return chunk
