"""Answer scoring and paired-bootstrap confidence intervals, shared by quickstart and compare.

Contract:
- `normalize(text)` lowercases, drops punctuation and articles and collapses spaces (SQuAD).
- `extract_answer(text)` is the one answer-extraction rule every arm gets: the first non-empty
  line of the reply, without a leading "Answer:" label.
- Per-question scores in [0, 1]: `exact_match` (normalised equality), `contains` (the gold answer
  occurs in the prediction on token boundaries: "317" does not match "1317"), `token_f1`
  (SQuAD token F1) and `rouge_l` (F-measure of the longest common token subsequence).
- `bootstrap_ci(values, clusters, ...)` resamples *clusters* (a fact's paraphrases are not
  independent questions) with a fixed seed; `paired_diff_ci(a, b, clusters)` resamples the same
  clusters for both arms, so the CI of the difference is the paired one.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}‘’“”–—]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LABEL = re.compile(r"^\s*(answer|a)\s*[:\-]\s*", re.IGNORECASE)
METRICS = ("exact_match", "contains", "f1", "rouge_l")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return _LABEL.sub("", line).strip()
    return ""


def contains(pred: str, gold: str) -> bool:
    p, g = normalize(pred), normalize(gold)
    if not g:
        return False
    return f" {g} " in f" {p} "


def accuracy(preds: list[str], golds: list[str]) -> float:
    if not golds:
        return 0.0
    return sum(contains(p, g) for p, g in zip(preds, golds)) / len(golds)


def exact_match(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold) and bool(normalize(gold)))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, gold: str) -> float:
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


def score_all(pred: str, gold: str) -> dict[str, float]:
    """Every metric for one answer; `contains` looks at the whole reply, the rest at the extracted answer."""
    answer = extract_answer(pred)
    return {
        "exact_match": exact_match(answer, gold),
        "contains": float(contains(pred, gold)),
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
