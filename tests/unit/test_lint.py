"""Data checks: duplicates, near-duplicates, leakage, empty answers, encoding, lengths."""

import json

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.lint import check, jaccard, shingles, signature, summary, train_warnings
from tunesmith.errors import UserError

LONG = "The harbour of Quillhaven was built in 1874 by settlers who came over the northern pass in winter"


def qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def wheres(report, kind):
    return [i["where"].rsplit(":", 1)[1] for i in report["issues"][kind]]


def test_duplicates_exact_and_near(tmp_path):
    data = write(
        tmp_path / "d.jsonl",
        [
            qa("Who built the harbour?", LONG),
            qa("who built the harbour ?", LONG + " "),  # same after normalisation → exact
            qa("Who built the harbour?", LONG.replace("winter", "spring")),  # one word of 19 → near
            qa("What is the capital of Zorbia?", "Quell, on the river Vant."),
            qa("What is the capital of Vantor?", "Moon City, by the sea."),  # same template, other facts
        ],
    )
    report = check([data])
    assert wheres(report, "exact_duplicate") == ["2"]
    assert wheres(report, "near_duplicate") == ["3"]
    assert "d.jsonl:1" in report["issues"]["near_duplicate"][0]["detail"]
    assert report["counts"]["leakage_exact"] == 0


def test_leakage_exact_and_near(tmp_path):
    train = write(
        tmp_path / "t.jsonl",
        [
            qa("What is the capital of Zorbia?", "Quell."),
            qa(LONG + "?", "yes"),
            qa("Something unrelated entirely", "no"),
        ],
    )
    evals = write(
        tmp_path / "e.jsonl",
        [
            qa("what is the capital of zorbia", "Quell"),
            qa(LONG.replace("winter", "spring") + "?", "yes"),  # one 3-gram of 17 differs
        ],
    )
    report = check([train], [evals])
    assert wheres(report, "leakage_exact") == ["1"]
    assert wheres(report, "leakage_near") == ["2"]
    assert "e.jsonl:2" in report["issues"]["leakage_near"][0]["detail"]


def test_empty_answers_and_encoding(tmp_path):
    data = write(
        tmp_path / "d.jsonl",
        [
            qa("q1", "   "),
            qa("Café in UTF-8 read as Latin-1: CafÃ©", "ok"),
            qa("smart quote gone wrong: itâ€™s", "ok"),
            qa("replacement \ufffd char", "ok"),
            qa("bell \x07 inside", "ok"),
            qa("clean text, tabs\tand\nnewlines are fine", "ok"),
        ],
    )
    report = check([data])
    assert wheres(report, "empty_answer") == ["1"]
    assert wheres(report, "encoding") == ["2", "3", "4", "5"]
    details = " ".join(i["detail"] for i in report["issues"]["encoding"])
    assert "mojibake" in details and "U+FFFD" in details and "U+0007" in details


def test_invalid_utf8_is_one_line_with_every_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(qa("a", "b")).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"b"', b'"\xe9"') + b"\n" + good + b"\n" + b'{"x": "\xff"}\n')
    with pytest.raises(UserError) as err:
        check([path])
    msg = str(err.value)
    assert f"{path}:2 (byte 0xe9)" in msg and f"{path}:4 (byte 0xff)" in msg and "\n" not in msg


def test_token_lengths_and_over_max_length(tmp_path, tiny_tokenizer):
    data = write(
        tmp_path / "d.jsonl", [qa(f"question {i}?", "short answer") for i in range(9)] + [qa("long " * 80, "x")]
    )
    report = check([data], tokenizer=tiny_tokenizer, max_length=32)
    lengths = report["lengths"]
    assert lengths["unit"] == "tokens" and lengths["n"] == 10
    assert sum(lengths["histogram"]["counts"]) == 10
    assert wheres(report, "over_max_length") == ["10"]
    assert lengths["max"] > 32 >= lengths["median"]
    text = summary(report)
    assert "over max_length (tokens)" in text and "#" in text


def test_minhash_tracks_jaccard():
    a = shingles(" ".join(f"w{i}" for i in range(60)))
    b = shingles(" ".join(f"w{i}" for i in range(6, 66)))
    exact = jaccard(a, b)
    estimate = float((signature(a) == signature(b)).mean())
    assert abs(estimate - exact) < 0.15


def test_train_warnings_name_the_checks(tmp_path):
    data = write(tmp_path / "d.jsonl", [qa("q", "a"), qa("q", "a"), qa("r", "b")])
    lines = train_warnings(DataConfig(train=[str(data)]))
    assert lines[0].startswith("1 exact duplicates, e.g. ") and lines[-1].startswith("see: tunesmith data check")
    assert train_warnings(DataConfig(train=[str(write(tmp_path / "ok.jsonl", [qa("q", "a")]))])) == []
