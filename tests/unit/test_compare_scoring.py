"""Scoring that cannot be fooled (issue 23): punctuation answers, identifiers, answers inside their
question; the guessing baselines; split names; and a table of scores computed by hand for a small
user-style question file, through the scoring entry point `compare` uses (no model)."""

import json
from pathlib import Path

import pytest

from tunesmith.errors import UserError
from tunesmith.eval.metrics import contains, exact_match, in_question, normalize, score_all, token_f1
from tunesmith.eval.questions import echoed, load_questions
from tunesmith.eval.scoring import base_guesses, kind, majority_guesses, score_results
from tunesmith.train.cpu import busy_warning

QUESTIONS = Path(__file__).resolve().parents[1] / "data" / "stdlib_questions.jsonl"
MAPPING = {"trained": "seen", "docs": "doc_only"}


@pytest.mark.parametrize(
    ("gold", "right", "wrong"),
    [
        ("''", "shlex.quote('') returns ''.", 'It returns "" (an empty string).'),
        ("'&'", "The separator is '&'.", "The separator is the ampersand."),
        ("' '", "It pads with ' ' by default.", "It pads with spaces."),
        ("'%'", "'%'", "the percent sign"),
    ],
)
def test_answers_with_no_words_are_matched_as_written(gold, right, wrong):
    assert normalize(gold) == ""  # the old rule compared empty strings and scored nothing
    assert contains(right, gold) and not contains(wrong, gold)
    assert score_all(right, gold)["contains"] == 1.0
    assert exact_match(gold, gold) == 1.0 and exact_match(gold + ".", gold) == 1.0 and exact_match(wrong, gold) == 0.0
    assert token_f1(gold, gold) == 1.0 and token_f1(wrong, gold) == 0.0


def test_identifier_characters_are_not_word_boundaries():
    assert normalize("Wave_read is in os.path, v3.14.") == "wave_read is in os.path v3.14"
    assert not contains("`Wave_read` is provided by the `tarfile` module.", "wave")  # was scored correct
    assert contains("The wave module provides it.", "wave")
    assert contains("Use os.path.join.", "os.path.join") and not contains("Use os.path.join.", "path")
    assert contains("It is the __name__ attribute", "__name__") and not contains("__name__", "name")
    assert contains("It was 1317.", "1317") and not contains("It was 1317.", "317")


def test_an_echo_of_the_question_does_not_score():
    q = "Which module provides the TarFile class, tarfile or zipfile?"
    assert in_question(q, "tarfile") and not in_question("Which module provides Wave_read?", "wave")
    assert contains("tarfile or zipfile", "tarfile")  # without the question: credited
    for echo in ("tarfile or zipfile", "The TarFile class, tarfile or zipfile, hm.", "provides TarFile"):
        assert not contains(echo, "tarfile", q), echo
    for answer in ("tarfile", "It is provided by tarfile.", "tarfile or zipfile: it is tarfile"):
        assert contains(answer, "tarfile", q), answer
    assert score_all("tarfile or zipfile", "tarfile", q)["contains"] == 0.0
    # literal answers follow the same rule: the question's '' is echoed, a fresh one counts
    lit = "Is the default separator '' or ' '?"
    assert not contains("'' or ' '", "''", lit) and contains("It is ''.", "''", lit)


def test_split_names_are_checked_and_mapped(tmp_path):
    with pytest.raises(UserError) as err:
        load_questions(QUESTIONS)
    msg = str(err.value)
    assert msg.startswith(f"{QUESTIONS}:1: unknown split 'trained'") and "compare.splits" in msg and "\n" not in msg
    rows = load_questions(QUESTIONS, splits=MAPPING)
    assert [q.split for q in rows] == ["seen"] * 5 + ["doc_only"] * 4
    assert [q.fact_id for q in echoed(rows)] == ["tarfile", "dunder"]
    with pytest.raises(UserError, match=r"compare.splits.trained: expected one of seen, doc_only, general"):
        load_questions(QUESTIONS, splits={"trained": "train"})
    plain = tmp_path / "q.jsonl"
    plain.write_text(json.dumps({"question": "Q?", "answer": "A"}) + "\n")
    assert load_questions(plain)[0].split == "all"  # no split named: all


def test_majority_guess_by_kind_from_the_other_training_facts():
    rows = load_questions(QUESTIONS, splits=MAPPING)
    assert kind("What is the default value of x?") == "what is"
    # leave-one-fact-out: a seen question is never guessed from its own answer
    guesses = majority_guesses(rows)
    assert guesses == ["True", "False", "True", "wave", "True", "wave", "wave", "True", "wave"]
    assert all(g != q.answer for g, q in zip(guesses[:5], rows[:5]))
    replies = ["Wave_read", "False", "False.", "x", "y", "It returns ''.", "b", "c", "d"]
    assert base_guesses(rows, replies) == {"seen": "False", "doc_only": "It returns ''."}


# The replies of two arms, and the scores worked out by hand in the comments (contains).
BASE = [
    "Wave_read is provided by the tarfile module.",  # wave: 0 (Wave_read is another word)
    "False",  # True: 0
    "False.",  # False: 1
    "It is the percent sign.",  # '%': 0
    "'/' on POSIX",  # '/': 1   → seen 2/5
    "It returns ''.",  # '': 1
    "tarfile or zipfile",  # tarfile: 0 (echoes the question)
    "False",  # True: 0
    "__name__ or __file__",  # __name__: 0 (echo)   → doc_only 1/4
]
TUNED = [
    "The wave module.",  # 1
    "True",  # 1
    "True",  # 0
    "'%'",  # 1
    "The separator is '/'.",  # 1   → seen 4/5
    'An empty string: ""',  # 0
    "It is provided by tarfile.",  # 1
    "True",  # 1
    "__name__",  # 1   → doc_only 3/4
]
HAND = {
    # (arm, split): (contains, exact_match)
    ("base", "seen"): (2 / 5, 1 / 5),  # EM: "False." only
    ("base", "doc_only"): (1 / 4, 0.0),
    ("finetuned", "seen"): (4 / 5, 2 / 5),  # EM: "True", "'%'"
    ("finetuned", "doc_only"): (3 / 4, 2 / 4),  # EM: "True", "__name__"
    # majority, leaving each question's own fact out: seen guesses True, False, True, wave, True → 0,0,0,0,0;
    # doc_only (no own fact among the training facts) wave, wave, True, wave → 0,0,1,0
    ("majority", "seen"): (0.0, 0.0),
    ("majority", "doc_only"): (1 / 4, 1 / 4),
    # base's commonest: "False" on seen (→ sort_keys only), "It returns ''." on doc_only (→ quote only)
    ("base_majority", "seen"): (1 / 5, 1 / 5),
    ("base_majority", "doc_only"): (1 / 4, 0.0),
}


def test_scores_equal_the_hand_computed_table():
    rows = load_questions(QUESTIONS, splits=MAPPING)
    out = score_results(rows, {"base": BASE, "finetuned": TUNED}, n_boot=200, seed=0)
    got = {
        (r["arm"], r["split"], r["metric"]): r for r in out["scores"] + out["baselines"]["rows"] if r["metric"] != "f1"
    }
    for (arm, split), (want_contains, want_em) in HAND.items():
        assert got[(arm, split, "contains")]["mean"] == pytest.approx(want_contains, abs=1e-4), (arm, split)
        assert got[(arm, split, "exact_match")]["mean"] == pytest.approx(want_em, abs=1e-4), (arm, split)
    assert got[("finetuned", "seen", "contains")]["diff_vs_base"] == pytest.approx(0.4)
    assert got[("finetuned", "doc_only", "contains")]["diff_vs_base"] == pytest.approx(0.5)
    assert got[("majority", "seen", "contains")]["diff_vs_base"] is None
    assert out["baselines"]["guesses"]["base_majority"] == {"seen": "False", "doc_only": "It returns ''."}


def test_busy_cpu_warning():
    line = busy_warning(2, "train.threads", load=0.6, n_cores=2)
    assert line and "load average 0.6 on 2 cores" in line and "train.threads=1" in line and "\n" not in line
    assert busy_warning(2, "train.threads", load=0.2, n_cores=2) is None  # idle machine
    assert busy_warning(1, "train.threads", load=3.0, n_cores=2) is None  # already one thread
    assert busy_warning(4, "compare.threads", load=1.0, n_cores=16) is None  # cores to spare


def test_compare_splits_and_threads_keys():
    from tunesmith.config import load_config

    assert load_config(None, ["compare.splits={trained: seen, docs: doc_only}"]).compare.splits == MAPPING
    assert load_config(None, ["compare.splits.trained=seen", "compare.threads=1"]).compare.splits == {"trained": "seen"}
    with pytest.raises(UserError, match=r"config key compare.splits: expected a mapping.*, got 5"):
        load_config(None, ["compare.splits=5"])
    with pytest.raises(UserError, match=r"config key compare.threads: expected a number >= 0"):
        load_config(None, ["compare.threads=-1"])
