"""Answer scoring shared by the quickstart and the comparison.

Contract: `normalize(text)` lowercases, drops punctuation and articles and collapses spaces
(SQuAD-style); `contains(pred, gold)` is true when the normalised gold answer occurs in the
normalised prediction on token boundaries ("317" does not match "1317").
"""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}‘’“”–—]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains(pred: str, gold: str) -> bool:
    p, g = normalize(pred), normalize(gold)
    if not g:
        return False
    return f" {g} " in f" {p} "


def accuracy(preds: list[str], golds: list[str]) -> float:
    if not golds:
        return 0.0
    return sum(contains(p, g) for p, g in zip(preds, golds)) / len(golds)
