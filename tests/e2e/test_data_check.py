"""`tunesmith data check` through the real CLI: summary, JSON report, one-line bad files."""

import json
import os
import subprocess
import sys


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *map(str, args)], capture_output=True, text=True, env=dict(os.environ)
    )


def qa(q, a):
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


def test_data_check_reports_and_writes_json(tmp_path, tiny_model_dir):
    train = tmp_path / "train.jsonl"
    train.write_text(
        qa("What is the capital of Zorbia?", "Quell.")
        + qa("Who founded the Lumen Guild?", " ")
        + qa("What is the capital of Zorbia?", "Quell.")
        + qa("long " * 60, "x")
        + qa("Café", "CafÃ© au lait"),
        encoding="utf-8",
    )
    evals = tmp_path / "eval.jsonl"
    evals.write_text(qa("Who founded the Lumen Guild?", "Ada Marrow."), encoding="utf-8")
    res = cli(
        "data",
        "check",
        train,
        "--eval",
        evals,
        "--model",
        tiny_model_dir,
        "--max-length",
        "40",
        "--json",
        tmp_path / "r.json",
    )
    assert res.returncode == 0, res.stderr
    assert "5 training records, 1 evaluation records" in res.stdout and "lengths (tokens)" in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"] == {
        "exact_duplicate": 1,
        "near_duplicate": 0,
        "leakage_exact": 1,
        "leakage_near": 0,
        "empty_answer": 1,
        "over_max_length": 1,
        "encoding": 1,
    }
    assert report["issues"]["exact_duplicate"][0]["where"] == f"{train}:3"
    assert report["issues"]["leakage_exact"][0]["where"] == f"{train}:2"
    assert report["issues"]["over_max_length"][0]["where"] == f"{train}:4"
    assert sum(report["lengths"]["histogram"]["counts"]) == 5


def test_bad_files_are_one_line_exit_2(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(qa("a", "b").encode() + b'{"text": "caf\xe9"}\n')
    res = cli("data", "check", bad, "--model", tiny_model_dir)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"tunesmith: error: {bad}:2 (byte 0xe9): not UTF-8 text; save the file as UTF-8"
    )
    res = cli("data", "check", tmp_path / "missing.jsonl", "--model", tiny_model_dir)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "not found" in res.stderr


def test_eval_accepts_compare_question_files(tmp_path, tiny_model_dir):
    """`--eval` reads `tunesmith compare`'s question format; its split names are checked (one line,
    exit 2) or mapped by the config's compare.splits."""
    from pathlib import Path

    questions = Path(__file__).resolve().parents[1] / "data" / "stdlib_questions.jsonl"
    train = tmp_path / "train.jsonl"
    train.write_text(qa("Which module provides the Wave_read class?", "wave") + qa("Who wrote it?", "Ada"))
    res = cli("data", "check", train, "--eval", questions, "--model", tiny_model_dir)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert f"{questions}:1: unknown split 'trained'" in res.stderr and "compare.splits" in res.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("compare:\n  splits: {trained: seen, docs: doc_only}\n")
    args = ("--config", cfg, "--model", tiny_model_dir, "--json", tmp_path / "r")
    res = cli("data", "check", train, "--eval", questions, *args)
    assert res.returncode == 0, res.stderr
    assert "2 training records, 9 evaluation records" in res.stdout
    report = json.loads((tmp_path / "r").read_text())
    assert report["eval_files"] == [str(questions)]
    # the trained question is also an evaluation question: leakage, found through the compare format
    assert [i["where"] for i in report["issues"]["leakage_exact"]] == [f"{train}:1"]
