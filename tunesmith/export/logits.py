"""Comparing next-token distributions: perplexity and KL divergence from raw logits.

Contract (numpy only; logits are position × vocab arrays, any float dtype):
- `log_softmax(logits)` → row-wise log-probabilities in float64.
- `nll_from_logits(logits, ids)` → mean negative log-likelihood of ids[1:] given the logits at
  positions [:-1].
- `divergence(reference, got, n)` → for each of the first `n` positions, KL(softmax(reference) ‖
  softmax(got)) in nats and whether the two argmax tokens agree: what llama.cpp's
  `llama-perplexity --kl-divergence` reports as "Mean KLD" and "Same top p" once averaged.
Both work `CHUNK` positions at a time, so memory stays a few chunks of float64 rows (a
49,152-token vocabulary is 0.4 MB per position in float64) however long the text.
"""

from __future__ import annotations

import numpy as np

CHUNK = 64  # positions converted to float64 at once


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def nll_from_logits(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at positions [:-1] (float64,
    `CHUNK` positions at a time: a 49,152-token vocabulary in float64 is 0.4 MB per position)."""
    n = len(ids) - 1
    total = 0.0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        logp = log_softmax(logits[start:stop])
        total -= float(logp[np.arange(stop - start), ids[start + 1 : stop + 1]].sum())
    return total / n


def divergence(reference: np.ndarray, got: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position of the first `n`: KL(softmax(reference) ‖ softmax(got)) in nats (float64) and
    whether the two argmax tokens agree — llama.cpp's `llama-perplexity --kl-divergence` measures."""
    kl, same = np.empty(n), np.empty(n, dtype=bool)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        ref, out = log_softmax(reference[start:stop]), log_softmax(got[start:stop])
        kl[start:stop] = np.maximum((np.exp(ref) * (ref - out)).sum(axis=-1), 0.0)  # ≥ 0 but for rounding
        same[start:stop] = ref.argmax(axis=-1) == out.argmax(axis=-1)
    return kl, same
