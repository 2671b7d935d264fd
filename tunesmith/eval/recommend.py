"""What `tunesmith compare` recommends per split, after the table: the best arm when the data separate it
from every other arm, else the arms tied at the top and the cheapest of them; on `general`, a forgetting check.

Contract (docs/compare.md, "The recommendation", says the same for users):
- `recommend(questions, replies, arms, cost, n_boot, seed, forgetting=None, guess=None)` →
  `{split: rec}` in question order. Per question and arm the primary metric (`contains`) comes from
  `scoring.per_question` (the score table's own scores); `recommend_split` does the rest from those
  per-question vectors, so tests can feed it correctness vectors directly.
- Separation: best = highest mean (ties: first in `compare.arms` order). Against each other arm, the
  95% CI of best − other is the paired bootstrap of `metrics.paired_diff_ci` (the same questions for
  both arms, a fact's questions resampled together, the score table's `n_boot` and seed). The best
  arm is a clear winner when every such CI lies above 0; the arms whose CI reaches 0 are tied with it
  at the top, and the recommendation is the cheapest of them: no training first, then the lower p50
  latency, then fewer prompt tokens.
- `general` is the forgetting control: each fine-tuned arm against the base arm (paired CI of
  fine-tuned − base); it forgot when the CI lies below 0. With `forgetting` (results' perplexity
  record) the perplexity ratio is added.
- No recommendation, and the sentence says why, when a split has fewer than `MIN_QUESTIONS`
  questions, when only one arm ran, or (on `general`) when base or every fine-tuned arm did not run.
  Arms of `ARMS` not in `arms` are listed in `not_run` and named in the sentence.
- Each rec: `split, n, status, best, tied, mean, ci, differences [{arm, diff, ci, separates}],
  recommended, cost {train_wall_s, latency_p50_s, prompt_tokens_mean}, not_run, sentence`.
  `status` is one of `winner`, `tie`, `too_few_questions`, `one_arm`, `forgets`, `no_forgetting`,
  `gains`, `no_forgetting_check`.
"""

from __future__ import annotations

import numpy as np

from tunesmith.eval.arms import ARMS, uses_finetuned
from tunesmith.eval.metrics import bootstrap_ci, paired_diff_ci
from tunesmith.eval.questions import GENERAL
from tunesmith.eval.scoring import fact_clusters, per_question

MIN_QUESTIONS = 10  # fewer questions in a split: no recommendation, the CIs are too wide to rank arms
METHOD = (
    "paired bootstrap over facts (the same questions for every arm, a fact's questions resampled together) "
    "of the difference between the best arm and each other arm; separated when its 95% CI excludes 0"
)


def recommend(
    questions, replies: dict, arms: list[str], cost: dict, n_boot: int, seed: int, forgetting=None, guess=None
) -> dict:
    """split → recommendation; `guess`: split → the best guessing baseline's mean (or None)."""
    metric = "contains"
    per_q = {arm: [s[metric] for s in per_question(questions, replies[arm])] for arm in arms}
    out = {}
    for split in dict.fromkeys(q.split for q in questions):
        idx = [i for i, q in enumerate(questions) if q.split == split]
        values = {arm: [per_q[arm][i] for i in idx] for arm in arms}
        out[split] = recommend_split(
            split,
            values,
            fact_clusters(questions, idx),
            cost,
            n_boot,
            seed,
            forgetting=forgetting,
            guess=(guess or {}).get(split),
        )
    return out


def recommend_split(split, values: dict, clusters, cost: dict, n_boot: int, seed: int, forgetting=None, guess=None):
    """One split's recommendation from per-question scores (`values`: arm → list, same questions, arm order)."""
    arms = list(values)
    n = len(next(iter(values.values()))) if values else 0
    rec = {
        "split": split,
        "n": n,
        "status": None,
        "best": None,
        "tied": [],
        "mean": None,
        "ci": None,
        "differences": [],
        "recommended": None,
        "cost": None,
        "not_run": [a for a in ARMS if a not in values],
        "sentence": "",
    }
    head = f"{split} (forgetting check)" if split == GENERAL else split
    if n < MIN_QUESTIONS:
        rec["status"] = "too_few_questions"
        rec["sentence"] = f"{head}: {n} questions, too few to recommend an arm (needs at least {MIN_QUESTIONS})."
        return rec
    if split == GENERAL:
        return _forgetting(rec, head, values, clusters, n_boot, seed, forgetting)
    if len(arms) < 2:
        rec["status"] = "one_arm"
        only = label(arms[0]) if arms else "no arm"
        rec["sentence"] = f"{split}: only {only} ran; nothing to compare it with, so no recommendation."
        return rec
    means = {a: float(np.mean(v)) for a, v in values.items()}
    best = max(arms, key=lambda a: means[a])  # max keeps the first of equal means: compare.arms order
    for arm in arms:
        if arm != best:
            lo, hi = paired_diff_ci(values[best], values[arm], clusters, n_boot, seed)
            rec["differences"].append(
                {"arm": arm, "diff": _r(means[best] - means[arm]), "ci": [_r(lo), _r(hi)], "separates": lo > 0}
            )
    tied = [best] + [d["arm"] for d in rec["differences"] if not d["separates"]]
    chosen = min(tied, key=lambda a: _cost_key(cost.get(a)))
    ci = bootstrap_ci(values[best], clusters, n_boot, seed)
    rec.update(best=best, tied=tied, mean=_r(means[best]), ci=[_r(ci[0]), _r(ci[1])], recommended=chosen)
    rec["cost"] = _cost_fields(cost.get(chosen))
    score = f"{pct(means[best])} [{pts(ci[0])}, {pts(ci[1])}]"
    if len(tied) == 1:
        rec["status"] = "winner"
        runner = max(rec["differences"], key=lambda d: (means[d["arm"]], -arms.index(d["arm"])))
        others = " and its lead over every other arm excludes 0 too" if len(rec["differences"]) > 1 else ""
        text = (
            f"{split}: {label(best)} is best ({score}); it beats {label(runner['arm'])} by "
            f"{pts(runner['diff'])} points [{pts(runner['ci'][0])}, {pts(runner['ci'][1])}] (paired bootstrap, "
            f"95% CI){others}."
        )
    else:
        rec["status"] = "tie"
        gaps = "; ".join(
            f"over {label(d['arm'])} {pts(d['diff'])} points [{pts(d['ci'][0])}, {pts(d['ci'][1])}]"
            for d in rec["differences"]
            if not d["separates"]
        )
        if len({means[a] for a in tied}) == 1:
            names = ", ".join(label(a) for a in tied[:-1]) + f" and {label(tied[-1])}"
            text = f"{split}: no clear winner: {names} {'both' if len(tied) == 2 else 'all'} score {pct(means[best])}."
        else:
            named = [f"{label(a)} ({pct(means[a])})" for a in tied]
            names = ", ".join(named[:-1]) + f" and {named[-1]}"
            text = (
                f"{split}: no clear winner between {names}: the 95% CI of {label(best)}'s "
                f"lead includes 0 (paired bootstrap: {gaps})."
            )
        text += f" {_cheapest(chosen, tied, cost)}"
    text += f" Cost of {label(chosen)}: {cost_text(cost.get(chosen))}."
    if guess is not None and ci[0] <= guess:
        text += f" Not above guessing: the best guessing baseline reaches {pct(guess)} on this split."
    if rec["not_run"]:
        text += f" Not run: {', '.join(label(a) for a in rec['not_run'])}."
    rec["sentence"] = text
    return rec


def _forgetting(rec: dict, head: str, values: dict, clusters, n_boot: int, seed: int, forgetting) -> dict:
    tuned = [a for a in values if uses_finetuned(a)]
    if "base" not in values or not tuned:
        rec["status"] = "no_forgetting_check"
        missing = ", ".join(label(a) for a in rec["not_run"] if a == "base" or uses_finetuned(a))
        rec["sentence"] = f"{head}: not checked; it needs the base arm and a fine-tuned arm (not run: {missing})."
        return rec
    base = float(np.mean(values["base"]))
    bci = bootstrap_ci(values["base"], clusters, n_boot, seed)
    parts, verdicts = [], []
    for arm in tuned:
        mean = float(np.mean(values[arm]))
        lo, hi = paired_diff_ci(values[arm], values["base"], clusters, n_boot, seed)
        ci = bootstrap_ci(values[arm], clusters, n_boot, seed)
        diff = mean - base
        verdict = "forgets" if hi < 0 else "gains" if lo > 0 else "no_forgetting"
        verdicts.append(verdict)
        rec["differences"].append(
            {
                "arm": arm,
                "vs": "base",
                "diff": _r(diff),
                "ci": [_r(lo), _r(hi)],
                "separates": verdict != "no_forgetting",
            }
        )
        way = (
            "no change, 0 points"
            if pts(diff) == "0"
            else f"{pts(abs(diff))} points {'lower' if diff < 0 else 'higher'}"
        )
        change = f"{way} [{pts(lo)}, {pts(hi)}]"
        said = {
            "forgets": "it forgot general knowledge",
            "gains": "no forgetting; it even gained",
            "no_forgetting": "no forgetting shown at this sample size (the CI includes 0)",
        }[verdict]
        parts.append(
            f"{label(arm)} scores {pct(mean)} [{pts(ci[0])}, {pts(ci[1])}], {change} (paired bootstrap): {said}"
        )
    rec["status"] = (
        "forgets" if "forgets" in verdicts else "gains" if all(v == "gains" for v in verdicts) else "no_forgetting"
    )
    rec.update(best=None, mean=_r(base), ci=[_r(bci[0]), _r(bci[1])])
    text = f"{head}: the base model scores {pct(base)} [{pts(bci[0])}, {pts(bci[1])}]; " + "; ".join(parts) + "."
    if forgetting and forgetting.get("ratio") is not None:
        text += (
            f" Perplexity on general text: base {forgetting['base_ppl']:.2f} → fine-tuned "
            f"{forgetting['finetuned_ppl']:.2f} (×{forgetting['ratio']:.2f})."
        )
    rec["sentence"] = text
    return rec


def _cheapest(chosen: str, tied: list[str], cost: dict) -> str:
    """Why the recommendation among tied arms is `chosen`, in words: the first cost that tells it from the
    next cheapest (no training, then p50 latency, then prompt tokens)."""
    if not all(cost.get(a) for a in tied):
        return f"Of these, {label(chosen)} is recommended (cost not measured for all of them)."
    mine = cost[chosen]
    others = sorted((a for a in tied if a != chosen), key=lambda a: _cost_key(cost.get(a)))
    nxt = cost[others[0]]
    untrained = not _trained(mine) and any(_trained(cost[a]) for a in others)
    if _trained(nxt) != _trained(mine):
        why = "it needs no training"
    elif _cost_key(mine)[1] < _cost_key(nxt)[1]:
        fast = f"answers fastest ({mine['latency_p50_s']:.2f} s p50)"
        why = f"it needs no training and {fast} of the untrained ones" if untrained else f"it {fast}"
    elif _cost_key(mine)[2] < _cost_key(nxt)[2]:
        why = "it sends the fewest prompt tokens"
    else:
        return f"Of these, {label(chosen)} is recommended (first in compare.arms; it costs no more than the others)."
    return f"{label(chosen)} is the cheapest of them: {why}."


def _trained(c: dict | None) -> bool:
    return bool((c or {}).get("train_wall_s"))


def _cost_key(c: dict | None) -> tuple:
    c = c or {}
    inf = float("inf")
    p50, tok = c.get("latency_p50_s"), c.get("prompt_tokens_mean")
    return (_trained(c), inf if p50 is None else p50, inf if tok is None else tok)


def _cost_fields(c: dict | None) -> dict | None:
    if not c:
        return None
    return {k: c.get(k) for k in ("train_wall_s", "latency_p50_s", "prompt_tokens_mean")}


def cost_text(c: dict | None) -> str:
    """'5 min of training, 2.1 s p50 latency, 410 prompt tokens' (what a cost record says, in words)."""
    if not c:
        return "not measured"
    s = c.get("train_wall_s")
    if not s:
        parts = ["no training"]
    elif s < 90:
        parts = [f"{s:.0f} s of training"]
    elif s < 90 * 60:
        parts = [f"{s / 60:.0f} min of training"]
    else:
        parts = [f"{s / 3600:.1f} h of training"]
    p50 = c.get("latency_p50_s")
    if p50 is not None:
        parts.append(f"{p50:.2f} s p50 latency" if p50 < 1 else f"{p50:.1f} s p50 latency")
    if c.get("prompt_tokens_mean") is not None:
        parts.append(f"{c['prompt_tokens_mean']:.0f} prompt tokens")
    return ", ".join(parts)


def label(arm: str) -> str:
    return ARMS[arm].label if arm in ARMS else arm


def pct(x: float) -> str:
    return f"{int(round(100 * x))}%"


def pts(x: float) -> str:
    """A fraction as whole percentage points (no '-0')."""
    return str(int(round(100 * x)))


def _r(x: float) -> float:
    return round(float(x), 4)
