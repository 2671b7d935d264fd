"""From the arms' replies to the numbers of `results.json`: scores, guessing baselines, recall, samples.

Contract (no model here: every function takes the questions and the replies as text):
- `score_results(questions, replies, n_boot, seed)` is the one scoring entry point `compare` uses:
  `{"scores": [...], "baselines": {...}}`. Each reply is scored with `metrics.score_all(reply,
  gold, question)`, so `contains` applies the echo rule to questions that hold their own answer.
  Score rows: per arm × split × metric, n, mean, 95% CI from a bootstrap over facts (questions of
  one fact resampled together) and the paired difference to the base arm with its CI.
- Baselines (`baselines`): what guessing reaches, per split, scored by the same rule:
  `majority` answers every question with the most frequent gold answer of the *training facts*
  (the `seen` split, or every non-`general` split when there is no `seen`; one vote per fact, ties
  to the answer met first) among those of the same *kind*, leaving out the question's own fact
  (else a seen question would be "guessed" from its own answer); a question's kind is its first
  two normalised words ("which module", "what is"), and a kind no other training fact has falls
  back to the commonest answer of the other training facts overall. `base_majority` answers every
  question of a split with the base arm's most frequent extracted answer on that split
  (normalised; needs the base arm).
  `baselines.rows` are shaped like score rows (arm = the baseline's name, no diff), `guesses`
  records each guess.
- `recall_rows(questions, contexts, arms, k)`: recall@k per RAG arm × split (not `general`): the
  share of questions for which at least one of the k retrieved chunks contains the gold answer
  (`metrics.contains`, no echo rule — a chunk is not a reply).
- `sample_rows(questions, replies, contexts)`: the first few questions per split and arm.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tunesmith.eval.arms import uses_context
from tunesmith.eval.metrics import METRICS, bootstrap_ci, contains, extract_answer, normalize, paired_diff_ci, score_all
from tunesmith.eval.questions import GENERAL

SAMPLES_PER_SPLIT = 3
BASELINES = ("majority", "base_majority")
RECALL_DEFINITION = (
    "recall@k: share of questions for which at least one of the k retrieved chunks put in the prompt contains "
    "the gold answer (the contains rule); whether the answer came from that chunk is not measured"
)


def score_results(questions, replies: dict[str, list[str]], n_boot: int, seed: int) -> dict:
    per_q = {arm: per_question(questions, texts) for arm, texts in replies.items()}
    return {"scores": _rows(questions, per_q, n_boot, seed), "baselines": baselines(questions, replies, n_boot, seed)}


def per_question(questions, texts: list[str]) -> list[dict]:
    return [score_all(t, q.answer, q.question) for t, q in zip(texts, questions)]


def fact_clusters(questions, idx) -> list:
    return [questions[i].fact_id or f"#{i}" for i in idx]


def _rows(questions, per_q: dict, n_boot: int, seed: int, diff: bool = True) -> list[dict]:
    rows = []
    for split in dict.fromkeys(q.split for q in questions):
        idx = [i for i, q in enumerate(questions) if q.split == split]
        clusters = fact_clusters(questions, idx)
        for arm in per_q:
            for metric in METRICS:
                vals = [per_q[arm][i][metric] for i in idx]
                row = {
                    "arm": arm,
                    "split": split,
                    "metric": metric,
                    "n": len(vals),
                    "mean": round(float(np.mean(vals)), 4),
                    "ci": _round(bootstrap_ci(vals, clusters, n_boot, seed)),
                    "diff_vs_base": None,
                    "diff_ci": None,
                }
                if diff and arm != "base" and "base" in per_q:
                    base = [per_q["base"][i][metric] for i in idx]
                    row["diff_vs_base"] = round(float(np.mean(vals) - np.mean(base)), 4)
                    row["diff_ci"] = _round(paired_diff_ci(vals, base, clusters, n_boot, seed))
                rows.append(row)
    return rows


def _round(pair) -> list[float]:
    return [round(pair[0], 4), round(pair[1], 4)]


def kind(question: str) -> str:
    """A question's kind for the majority baseline: its first two normalised words."""
    return " ".join(normalize(question).split()[:2])


def _commonest(answers: list[str]) -> str | None:
    if not answers:
        return None
    counts = Counter(answers)
    top = max(counts.values())
    return next(a for a in answers if counts[a] == top)  # ties: the answer met first


def majority_guesses(questions) -> list[str | None]:
    """Per question: the commonest gold answer of the other training facts of its kind, else of
    the other training facts overall (leave its own fact out: a fact is not a guess of itself)."""
    training = [q for q in questions if q.split == "seen"] or [q for q in questions if q.split != GENERAL]
    facts: dict = {}
    for i, q in enumerate(training):
        fact = facts.setdefault(q.fact_id or f"#{i}", {"answer": q.answer, "kinds": [], "questions": set()})
        fact["kinds"].append(kind(q.question))
        fact["questions"].add(q.question)
    guesses = []
    for q in questions:
        others = [f for key, f in facts.items() if key != q.fact_id and q.question not in f["questions"]]
        same = [f["answer"] for f in others if kind(q.question) in f["kinds"]]
        guesses.append(_commonest(same) or _commonest([f["answer"] for f in others]))
    return guesses


def base_guesses(questions, base_replies: list[str]) -> dict[str, str]:
    """split → the base arm's commonest extracted answer on it (as first written)."""
    out = {}
    for split in dict.fromkeys(q.split for q in questions):
        answers = [extract_answer(base_replies[i]) for i, q in enumerate(questions) if q.split == split]
        norm = _commonest([normalize(a) or a for a in answers])
        if norm is not None:
            out[split] = next(a for a in answers if (normalize(a) or a) == norm)
    return out


def baselines(questions, replies: dict, n_boot: int, seed: int) -> dict:
    majority = majority_guesses(questions)
    guesses, constant = {"majority": majority}, {}
    if all(g is not None for g in majority) and majority:
        constant["majority"] = majority
    if "base" in replies:
        guesses["base_majority"] = base_guesses(questions, replies["base"])
        constant["base_majority"] = [guesses["base_majority"][q.split] for q in questions]
    per_q = {name: per_question(questions, texts) for name, texts in constant.items()}
    return {"rows": _rows(questions, per_q, n_boot, seed, diff=False), "guesses": guesses}


def guess_level(results: dict, split: str, metric: str) -> float | None:
    """The best guessing baseline's mean on a split (None when no baseline was scored)."""
    rows = (results.get("baselines") or {}).get("rows") or []
    means = [r["mean"] for r in rows if r["split"] == split and r["metric"] == metric]
    return max(means) if means else None


def recall_rows(questions, contexts, arms, k: int) -> list[dict]:
    rows = []
    for arm in arms:
        if not uses_context(arm):
            continue
        for split in dict.fromkeys(q.split for q in questions):
            if split == GENERAL:
                continue  # general questions are not about the documents
            hits = [
                any(contains(ch, q.answer) for ch in contexts[i]) for i, q in enumerate(questions) if q.split == split
            ]
            rows.append(
                {"arm": arm, "split": split, "k": k, "recall_at_k": round(sum(hits) / len(hits), 4), "n": len(hits)}
            )
    return rows


def sample_rows(questions, replies: dict, contexts) -> list[dict]:
    out = []
    for split in dict.fromkeys(q.split for q in questions):
        idx = [i for i, q in enumerate(questions) if q.split == split][:SAMPLES_PER_SPLIT]
        for arm, texts in replies.items():
            for i in idx:
                row = {
                    "arm": arm,
                    "split": split,
                    "question": questions[i].question,
                    "answer": questions[i].answer,
                    "prediction": texts[i],
                    "correct": contains(texts[i], questions[i].answer, questions[i].question),
                }
                if uses_context(arm) and contexts[i] is not None:
                    row["retrieved"] = contexts[i]
                out.append(row)
    return out
