"""`tunesmith compare`'s recommendation (issue 22): synthetic per-question correctness through the real
scoring (replies scored by `scoring.per_question`, CIs by the paired bootstrap of `eval.metrics`), then
the sentence, the results record, the terminal lines and the report section."""

from __future__ import annotations

import copy
import json
import random
from html import escape
from pathlib import Path

import numpy as np

from tunesmith.eval.metrics import paired_diff_ci
from tunesmith.eval.questions import Question
from tunesmith.eval.recommend import MIN_QUESTIONS, cost_text, recommend, recommend_split
from tunesmith.eval.report import render_html
from tunesmith.eval.scoring import score_results
from tunesmith.eval.table import print_recommendations

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "compare_results_example.json"
COST = {
    "base": {"train_wall_s": 0, "latency_p50_s": 0.41, "prompt_tokens_mean": 38.2},
    "prompt": {"train_wall_s": 0, "latency_p50_s": 0.63, "prompt_tokens_mean": 196.5},
    "rag": {"train_wall_s": 0, "latency_p50_s": 0.88, "prompt_tokens_mean": 412.9},
    "finetuned": {"train_wall_s": 221.0, "latency_p50_s": 0.33, "prompt_tokens_mean": 38.2},
    "finetuned_rag": {"train_wall_s": 300.0, "latency_p50_s": 2.1, "prompt_tokens_mean": 410.0},
}


def _questions(split: str, n: int, per_fact: int = 2) -> list[Question]:
    return [
        Question(f"What is item {i}?", f"answer{i}", split, f"{split}-f{i // per_fact}", f"q.jsonl:{i + 1}")
        for i in range(n)
    ]


def _replies(questions, correct: list[bool]) -> list[str]:
    """A reply that holds the gold answer where `correct`, a wrong one elsewhere (scored by the real rules)."""
    return [f"It is {q.answer}." if ok else "I do not know." for q, ok in zip(questions, correct)]


def _correct(n: int, rate: float, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < rate for _ in range(n)]


def _run(splits: dict, rates: dict, forgetting=None, guess=None, n_boot=500):
    """splits: name → n; rates: arm → {split: accuracy}. Returns (questions, replies, recommendations, scores)."""
    questions = [q for split, n in splits.items() for q in _questions(split, n)]
    replies = {}
    for k, (arm, by_split) in enumerate(rates.items()):
        correct = []
        for j, split in enumerate(splits):
            correct += _correct(splits[split], by_split[split], seed=10 * k + j)
        replies[arm] = _replies(questions, correct)
    recs = recommend(questions, replies, list(rates), COST, n_boot, 0, forgetting, guess)
    return questions, replies, recs, score_results(questions, replies, n_boot, 0)["scores"]


def test_clear_winner_is_named_with_its_paired_lead_and_cost():
    rates = {"base": {"seen": 0.05}, "rag": {"seen": 0.45}, "finetuned": {"seen": 0.3}, "finetuned_rag": {"seen": 0.95}}
    questions, replies, recs, scores = _run({"seen": 40}, rates)
    rec = recs["seen"]
    assert rec["status"] == "winner" and rec["best"] == "finetuned_rag" and rec["tied"] == ["finetuned_rag"]
    assert rec["recommended"] == "finetuned_rag" and rec["n"] == 40
    # the best arm's mean and CI are the score table's
    row = next(r for r in scores if (r["arm"], r["split"], r["metric"]) == ("finetuned_rag", "seen", "contains"))
    assert rec["mean"] == row["mean"] and rec["ci"] == row["ci"]
    assert {d["arm"] for d in rec["differences"]} == {"base", "rag", "finetuned"}
    score = {r["arm"]: r["mean"] for r in scores if r["metric"] == "contains"}
    for d in rec["differences"]:
        assert d["separates"] and d["ci"][0] > 0
        assert abs(d["diff"] - (score["finetuned_rag"] - score[d["arm"]])) < 1e-3
    runner = max(rec["differences"], key=lambda d: score[d["arm"]])
    assert runner["arm"] == "rag"
    s = rec["sentence"]
    lead = f"by {round(100 * runner['diff'])} points [{round(100 * runner['ci'][0])}, {round(100 * runner['ci'][1])}]"
    assert s.startswith(f"seen: Fine-tuned + RAG is best ({round(100 * rec['mean'])}% [")
    assert "it beats RAG " + lead in s and "paired bootstrap" in s
    assert "Cost of Fine-tuned + RAG: 5 min of training, 2.1 s p50 latency, 410 prompt tokens." in s
    assert "Not run: Prompt engineering." in s and rec["not_run"] == ["prompt"]
    assert rec["cost"] == {"train_wall_s": 300.0, "latency_p50_s": 2.1, "prompt_tokens_mean": 410.0}


def test_tie_at_the_top_recommends_the_cheapest_of_the_tied_arms():
    n = 30
    questions = _questions("doc_only", n)
    same = _correct(n, 0.6, seed=1)
    tuned = list(same)
    tuned[same.index(False)] = True  # one more right: the higher mean, not separated
    replies = {
        "base": _replies(questions, [False] * n),
        "rag": _replies(questions, same),
        "finetuned_rag": _replies(questions, tuned),
    }
    rec = recommend(questions, replies, list(replies), COST, 500, 0)["doc_only"]
    assert rec["status"] == "tie" and rec["best"] == "finetuned_rag"
    assert rec["tied"] == ["finetuned_rag", "rag"] and rec["recommended"] == "rag"
    by = {d["arm"]: d for d in rec["differences"]}
    assert by["base"]["separates"] and not by["rag"]["separates"] and by["rag"]["ci"][0] <= 0 < by["rag"]["ci"][1]
    s = rec["sentence"]
    assert s.startswith("doc_only: no clear winner between Fine-tuned + RAG (")
    assert "RAG is the cheapest of them: it needs no training." in s
    assert "Cost of RAG: no training, 0.88 s p50 latency, 413 prompt tokens." in s
    # the differences are the paired bootstrap of the real per-question scores, same seed and samples
    lo, hi = paired_diff_ci([float(t) for t in tuned], [float(x) for x in same], [q.fact_id for q in questions], 500, 0)
    assert by["rag"]["ci"] == [round(lo, 4), round(hi, 4)]


def test_equal_means_every_arm_tied_first_arm_is_best_and_not_above_guessing():
    questions = _questions("seen", 12)
    replies = {arm: _replies(questions, [False] * 12) for arm in ("base", "finetuned", "rag")}
    rec = recommend(questions, replies, list(replies), COST, 200, 0, guess={"seen": 0.0})["seen"]
    assert rec["status"] == "tie" and rec["best"] == "base" and set(rec["tied"]) == {"base", "finetuned", "rag"}
    assert rec["recommended"] == "base"  # untrained, fastest of the untrained
    assert rec["sentence"].startswith("seen: no clear winner: Base model, zero-shot, Fine-tuned and RAG all score 0%.")
    assert (
        "is the cheapest of them: it needs no training and answers fastest (0.41 s p50) of the untrained"
        in (rec["sentence"])
    )
    assert all(d["ci"] == [0.0, 0.0] and not d["separates"] for d in rec["differences"])
    assert "no clear winner" in rec["sentence"] and "Not above guessing" in rec["sentence"]


def test_single_arm_and_too_few_questions_give_no_recommendation():
    _, _, recs, _ = _run({"seen": 20}, {"base": {"seen": 0.5}})
    rec = recs["seen"]
    assert rec["status"] == "one_arm" and rec["best"] is None and rec["recommended"] is None
    assert "only Base model, zero-shot ran" in rec["sentence"] and "no recommendation" in rec["sentence"]
    _, _, recs, _ = _run(
        {"seen": MIN_QUESTIONS - 1, "doc_only": MIN_QUESTIONS},
        {"base": {"seen": 0.1, "doc_only": 0.1}, "rag": {"seen": 1.0, "doc_only": 1.0}},
    )
    assert recs["seen"]["status"] == "too_few_questions" and recs["seen"]["best"] is None
    assert recs["seen"]["sentence"] == (
        f"seen: {MIN_QUESTIONS - 1} questions, too few to recommend an arm (needs at least {MIN_QUESTIONS})."
    )
    assert recs["doc_only"]["status"] == "winner" and recs["doc_only"]["best"] == "rag"


def test_general_split_is_a_forgetting_check():
    forgetting = {"text": "g.txt", "base_ppl": 11.36, "finetuned_ppl": 18.39, "ratio": 1.619}
    rates = {
        "base": {"general": 0.8},
        "rag": {"general": 0.9},
        "finetuned": {"general": 0.15},
        "finetuned_rag": {"general": 0.8},
    }
    _, replies, recs, scores = _run({"general": 40}, rates, forgetting=forgetting)
    rec = recs["general"]
    assert rec["status"] == "forgets" and rec["best"] is None
    by = {d["arm"]: d for d in rec["differences"]}
    assert set(by) == {"finetuned", "finetuned_rag"}  # only the fine-tuned arms, each against base
    diff = {r["arm"]: r for r in scores if r["metric"] == "contains"}
    for arm in by:  # the score table's own paired Δ vs base
        assert by[arm]["diff"] == diff[arm]["diff_vs_base"] and by[arm]["ci"] == diff[arm]["diff_ci"]
    assert by["finetuned"]["ci"][1] < 0
    s = rec["sentence"]
    assert s.startswith("general (forgetting check): the base model scores")
    assert f"Fine-tuned scores {round(100 * diff['finetuned']['mean'])}% [" in s and "it forgot general knowledge" in s
    assert f"{abs(round(100 * by['finetuned']['diff']))} points lower" in s
    assert "(×1.62)" in s
    lo, hi = by["finetuned_rag"]["ci"]  # each arm's verdict follows its own CI
    said = "it forgot" if hi < 0 else "it even gained" if lo > 0 else "no forgetting shown"
    assert said in s.split("Fine-tuned + RAG scores")[1]
    # no fine-tuned arm: the check is not made, and it says why
    rec = recommend_split("general", {"base": [1.0] * 12, "rag": [0.0] * 12}, None, COST, 100, 0)
    assert rec["status"] == "no_forgetting_check" and "Fine-tuned, Fine-tuned + RAG" in rec["sentence"]
    # same scores: no forgetting
    same = [1.0, 0.0] * 8
    rec = recommend_split("general", {"base": same, "finetuned": same}, None, COST, 100, 0)
    assert rec["status"] == "no_forgetting" and "0 points" in rec["sentence"]


def test_cost_text():
    assert cost_text(COST["base"]) == "no training, 0.41 s p50 latency, 38 prompt tokens"
    assert cost_text({"train_wall_s": 42, "latency_p50_s": None, "prompt_tokens_mean": 10}) == (
        "42 s of training, 10 prompt tokens"
    )
    assert cost_text({"train_wall_s": 7200}) == "2.0 h of training" and cost_text(None) == "not measured"


def test_terminal_lines_and_report_section(capsys):
    rates = {"base": {"seen": 0.1, "general": 0.7}, "finetuned": {"seen": 0.9, "general": 0.2}}
    _, _, recs, _ = _run({"seen": 20, "general": 20}, rates)
    recs["seen"]["sentence"] += ' <script>console.error("x")</script> & more'  # hostile text is escaped
    results = json.loads(EXAMPLE.read_text())
    results["recommendations"] = {"method": "paired bootstrap", "min_questions": MIN_QUESTIONS, "splits": recs}
    json.dumps(results)  # what results.json holds serialises
    print_recommendations(results)
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"  {recs['seen']['sentence']}", f"  {recs['general']['sentence']}"]
    html = render_html(results)
    for split, rec in recs.items():
        assert f'<li id="rec-{split}">{escape(rec["sentence"])}</li>' in html
    assert "<script>" not in html
    # after the score table, before the charts
    assert html.index('id="score-base"') < html.index("<h2>Recommendation</h2>") < html.index("<h2>Charts</h2>")
    old = copy.deepcopy(results)
    del old["recommendations"]
    assert "No recommendation in these results" in render_html(old)
    print_recommendations(old)
    assert capsys.readouterr().out == ""


def test_bootstrap_is_deterministic_and_uses_the_given_samples():
    v = {"base": list(np.tile([0.0, 1.0], 10)), "rag": [1.0] * 20}
    a = recommend_split("seen", v, None, COST, 300, 0)
    assert a == recommend_split("seen", v, None, COST, 300, 0)
    assert a["differences"][0]["ci"] == [round(x, 4) for x in paired_diff_ci(v["rag"], v["base"], None, 300, 0)]
