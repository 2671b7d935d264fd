"""Answer scoring and paired-bootstrap confidence intervals, shared by quickstart and compare.

Contract (docs/compare.md, "Scoring", states the same rules for users):
- `normalize(text)` lowercases, turns punctuation into spaces, drops the articles a/an/the and
  collapses spaces (SQuAD), except that identifier characters are not word boundaries: `_` is
  kept, and so is a `.` between two word characters (`os.path`, `3.14`, `Wave_read`).
- A gold answer that normalises to nothing (`''`, `'&'`, `' '`, `%`) is matched *as written*:
  whitespace runs are collapsed, nothing else changes (`literal`).
- `extract_answer(text)` is the one answer-extraction rule every arm gets: the first non-empty
  line of the reply, without a leading "Answer:" label.
- `contains(pred, gold, question=None)`: the gold answer occurs in the reply as a whole run of
  normalised tokens ("317" does not match "1317", "wave" does not match "Wave_read"), or as
  written for a literal answer. When `question` holds the answer itself (`in_question`), an
  occurrence in the reply that merely echoes the question does not count: an occurrence is an echo
  when the word just before it, or just after it, is the word just before (respectively after) one
  of the answer's occurrences in the question; `contains` is true when at least one occurrence in
  the reply is not an echo.
- Per-question scores in [0, 1] (`score_all`): `exact_match` (the extracted answer equals the
  gold, normalised; as written for a literal answer, a trailing period aside), `contains` (above,
  on the whole reply, the primary metric), `token_f1` (SQuAD token F1) and `rouge_l` (F-measure
  of the longest common token subsequence) on the extracted answer; for a literal answer F1 and
  ROUGE-L equal exact match.
- `bootstrap_ci(values, clusters, ...)` resamples *clusters* (a fact's paraphrases are not
  independent questions) with a fixed seed; `paired_diff_ci(a, b, clusters)` resamples the same
  clusters for both arms, so the CI of the difference is the paired one.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_PUNCT = re.compile("[" + re.escape(string.punctuation.replace("_", "")) + "‘’“”–—]")
_INNER_DOT = re.compile(r"(?<=\w)\.(?=\w)")
_ARTICLES = frozenset(("a", "an", "the"))
_LABEL = re.compile(r"^\s*(answer|a)\s*[:\-]\s*", re.IGNORECASE)
METRICS = ("exact_match", "contains", "f1", "rouge_l")


def normalize(text: str) -> str:
    text = _INNER_DOT.sub("\0", text.lower())  # a dot inside a name is part of it
    text = _PUNCT.sub(" ", text).replace("\0", ".")
    return " ".join(t for t in text.split() if t not in _ARTICLES)


def literal(text: str) -> str:
    """The text as written, whitespace runs collapsed: how an answer with no words is matched."""
    return " ".join(text.split())


def is_literal(gold: str) -> bool:
    return not normalize(gold) and bool(literal(gold))


def extract_answer(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return _LABEL.sub("", line).strip()
    return ""


def _occurrences(text: str, gold: str) -> list[tuple[str | None, str | None]]:
    """(word before, word after) of every occurrence of `gold` in `text`, None at either end."""
    out = []
    if is_literal(gold):
        s, g = literal(text), literal(gold)
        start = s.find(g)
        while start >= 0:
            before, after = normalize(s[:start]).split(), normalize(s[start + len(g) :]).split()
            out.append((before[-1] if before else None, after[0] if after else None))
            start = s.find(g, start + 1)
        return out
    toks, g = normalize(text).split(), normalize(gold).split()
    if not g:
        return out
    for i in range(len(toks) - len(g) + 1):
        if toks[i : i + len(g)] == g:
            out.append((toks[i - 1] if i else None, toks[i + len(g)] if i + len(g) < len(toks) else None))
    return out


def in_question(question: str, gold: str) -> bool:
    """Whether the question itself holds its gold answer (flagged at load, scored with `contains`'s echo rule)."""
    return bool(_occurrences(question, gold))


def contains(pred: str, gold: str, question: str | None = None) -> bool:
    found = _occurrences(pred, gold)
    echoes = _occurrences(question, gold) if question else []
    if not echoes:
        return bool(found)
    before = {b for b, _ in echoes if b is not None}
    after = {a for _, a in echoes if a is not None}
    return any(b not in before and a not in after for b, a in found)


def accuracy(preds: list[str], golds: list[str]) -> float:
    if not golds:
        return 0.0
    return sum(contains(p, g) for p, g in zip(preds, golds)) / len(golds)


def exact_match(pred: str, gold: str) -> float:
    if is_literal(gold):
        answer = literal(pred)
        return float(answer == literal(gold) or answer.removesuffix(".").rstrip() == literal(gold))
    return float(normalize(pred) == normalize(gold) and bool(normalize(gold)))


def token_f1(pred: str, gold: str) -> float:
    if is_literal(gold):
        return exact_match(pred, gold)
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, gold: str) -> float:
    if is_literal(gold):
        return exact_match(pred, gold)
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return 0.0
    prev = [0] * (len(g) + 1)
    for tok in p:
        cur = [0]
        for j, gt in enumerate(g, 1):
            cur.append(prev[j - 1] + 1 if tok == gt else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def score_all(pred: str, gold: str, question: str | None = None) -> dict[str, float]:
    """Every metric for one answer; `contains` looks at the whole reply, the rest at the extracted answer."""
    answer = extract_answer(pred)
    return {
        "exact_match": exact_match(answer, gold),
        "contains": float(contains(pred, gold, question)),
        "f1": token_f1(answer, gold),
        "rouge_l": rouge_l(answer, gold),
    }


def _cluster_index(clusters: list) -> tuple[np.ndarray, int]:
    ids: dict = {}
    index = np.array([ids.setdefault(c, len(ids)) for c in clusters], dtype=np.int64)
    return index, len(ids)


def _resampled_means(values: np.ndarray, clusters: list, n_boot: int, seed: int) -> np.ndarray:
    """Means of `values` (shape [n] or [arms, n]) over `n_boot` cluster resamples."""
    index, n_clusters = _cluster_index(clusters)
    values = np.atleast_2d(values)
    sums = np.zeros((values.shape[0], n_clusters))
    counts = np.bincount(index, minlength=n_clusters).astype(float)
    for row in range(values.shape[0]):
        sums[row] = np.bincount(index, weights=values[row], minlength=n_clusters)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    weight = np.stack([np.bincount(d, minlength=n_clusters) for d in draws])  # [n_boot, n_clusters]
    return (weight @ sums.T) / (weight @ counts)[:, None]  # [n_boot, arms]


def bootstrap_ci(values, clusters: list | None = None, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    vals = np.asarray(values, dtype=float)
    if vals.size == 0:
        return (float("nan"), float("nan"))
    clusters = clusters if clusters is not None else list(range(vals.size))
    means = _resampled_means(vals, clusters, n_boot, seed)[:, 0]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff_ci(a, b, clusters: list | None = None, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% CI of mean(a) - mean(b), resampling the same clusters for both."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if va.size == 0:
        return (float("nan"), float("nan"))
    clusters = clusters if clusters is not None else list(range(va.size))
    means = _resampled_means(np.stack([va, vb]), clusters, n_boot, seed)
    diff = means[:, 0] - means[:, 1]
    return float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))
