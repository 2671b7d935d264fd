"""`tunesmith compare` through the real console script on a tiny Llama: trains when needed, then
answers with all five arms, scores them, and writes results.json and report.html."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.tiny import NAMES, write_config, write_qa_jsonl
from tunesmith.infer.generate import generate_batch
from tunesmith.infer.load import load_for_inference

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")
ARMS = ["base", "prompt", "rag", "finetuned", "finetuned_rag"]


def cli(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=600)


def _questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compare")
    data = write_qa_jsonl(tmp / "qa.jsonl")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "answers.md").write_text("\n\n".join(f"The answer {i} is {NAMES[i % len(NAMES)]}." for i in range(24)))
    questions = _questions(
        tmp / "q.jsonl",
        [
            *(
                {
                    "question": f"What is the answer {i}?",
                    "answer": NAMES[i % len(NAMES)],
                    "fact_id": f"a{i}",
                    "split": "seen",
                }
                for i in range(10)  # 10: enough for compare to recommend an arm on this split
            ),
            *(
                {
                    "question": f"Tell me answer {i}",
                    "answer": NAMES[i % len(NAMES)],
                    "fact_id": f"b{i}",
                    "split": "doc_only",
                }
                for i in range(20, 24)
            ),
        ],
    )
    general = _questions(
        tmp / "general.jsonl",
        [
            {"question": "What is the capital of France?", "answer": "Paris"},
            {"question": "How many days are in a week?", "answer": "7"},
        ],
    )
    compare = {
        "questions": str(questions),
        "documents": str(docs),
        "max_new_tokens": 6,
        "latency_samples": 2,
        "general_questions": str(general),
        "bootstrap": 200,
        "top_k": 2,
        "chunk_size": 12,
        "chunk_overlap": 2,
        "k_shot": 2,
    }
    cfg = write_config(
        tmp / "c.yaml",
        tiny_model_dir,
        data,
        tmp / "run",
        data={"system_prompt": "Answer briefly.", "cache_dir": str(tmp / "cache")},
        compare=compare,
    )
    proc = cli("compare", str(cfg))
    return tmp, cfg, proc


def test_compare_trains_then_writes_table_results_and_report(setup):
    tmp, _, proc = setup
    assert proc.returncode == 0, proc.stderr[-2000:]
    run, out = tmp / "run", tmp / "run" / "compare"
    assert (run / "adapter_model.safetensors").is_file()  # no run given: the config's run was trained first
    assert "training" in proc.stdout and "Δ = arm − base" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in res["arms"]] == ARMS
    assert [s["name"] for s in res["splits"]] == ["seen", "doc_only", "general"]
    assert len(res["scores"]) == 5 * 3 * 4
    for row in res["scores"]:
        assert row["ci"][0] - 1e-9 <= row["mean"] <= row["ci"][1] + 1e-9
        assert (row["diff_vs_base"] is None) == (row["arm"] == "base")
    assert {(r["arm"], r["split"]) for r in res["retrieval"]} == {
        (a, s) for a in ("rag", "finetuned_rag") for s in ("seen", "doc_only")
    }
    # the documents hold every answer, and BM25 finds "answer N" among 12-word chunks
    assert all(r["recall_at_k"] >= 0.75 for r in res["retrieval"]), res["retrieval"]
    cost = res["cost"]
    assert cost["rag"]["prompt_tokens_mean"] > cost["base"]["prompt_tokens_mean"]
    assert cost["prompt"]["prompt_tokens_mean"] > cost["base"]["prompt_tokens_mean"]
    assert cost["finetuned"]["train_wall_s"] > 0 and cost["base"]["train_wall_s"] == 0
    assert cost["finetuned"]["model_size_mib"] > cost["base"]["model_size_mib"]
    assert res["forgetting"]["base_ppl"] > 1 and res["forgetting"]["ratio"] > 0
    assert res["settings"]["precision"] == "fp32"  # auto, with the suite's bf16 units pinned off
    assert "<html" in (out / "report.html").read_text()
    # guessing baselines per split, in the results, the table and the report
    guesses = {(r["arm"], r["split"]) for r in res["baselines"]["rows"] if r["metric"] == "contains"}
    assert guesses == {(b, s) for b in ("majority", "base_majority") for s in ("seen", "doc_only", "general")}
    assert "majority guess" in proc.stdout and "base majority " in proc.stdout
    assert 'id="guess-majority"' in (out / "report.html").read_text()
    # the audit trail: k-shot examples, each arm's exact prompt for the first questions, retrieval
    audit = res["audit"]
    assert len(audit["k_shot_examples"]) == 2 and all(e["question"] and e["answer"] for e in audit["k_shot_examples"])
    assert [p["arm"] for p in audit["prompts"]] == [a for a in ARMS for _ in range(3)]
    first = res["answers"][0]["question"]
    assert all(first in p["prompt"] for p in audit["prompts"][::3])
    assert audit["k_shot_examples"][0]["question"] in audit["prompts"][3]["prompt"]  # the prompt arm's shots
    assert audit["retrieval"]["top_k"] == 2 and "at least one of the k" in audit["retrieval"]["recall_at_k"]
    assert "reusing run" not in proc.stdout and "loading model" in proc.stdout  # trained here, then loaded


def test_recommendation_printed_and_in_results_and_report(setup):
    """After the table, one line per split: seen (10 questions) ranks the arms by the paired bootstrap,
    doc_only (4) and general (2) are too small and say so; the same sentences in results.json and report.html."""
    from html import escape

    tmp, _, proc = setup
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp / "run" / "compare"
    res = json.loads((out / "results.json").read_text())
    recs = res["recommendations"]["splits"]
    assert list(recs) == ["seen", "doc_only", "general"]
    assert [recs[s]["status"] for s in ("doc_only", "general")] == ["too_few_questions"] * 2
    seen = recs["seen"]
    assert seen["n"] == 10 and seen["status"] in ("winner", "tie")
    means = {r["arm"]: r["mean"] for r in res["scores"] if r["split"] == "seen" and r["metric"] == "contains"}
    assert seen["mean"] == means[seen["best"]] == max(means.values())
    assert {d["arm"] for d in seen["differences"]} == set(ARMS) - {seen["best"]}
    for d in seen["differences"]:
        assert d["separates"] == (d["ci"][0] > 0) and abs(d["diff"] - (means[seen["best"]] - means[d["arm"]])) < 1e-3
    assert seen["tied"] == [seen["best"]] + [d["arm"] for d in seen["differences"] if not d["separates"]]
    assert (
        seen["recommended"] in seen["tied"]
        and seen["cost"]["latency_p50_s"] == (res["cost"][seen["recommended"]]["latency_p50_s"])
    )
    assert ("is best" in seen["sentence"]) == (seen["status"] == "winner")
    assert ("no clear winner" in seen["sentence"]) == (seen["status"] == "tie")
    lines = proc.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("recommendation (contains")))
    assert at > lines.index(next(line for line in lines if "Δ = arm − base" in line))  # after the table
    assert lines[at + 1 : at + 4] == [f"  {recs[s]['sentence']}" for s in ("seen", "doc_only", "general")]
    html = (out / "report.html").read_text()
    for split, rec in recs.items():
        assert f'<li id="rec-{split}">{escape(rec["sentence"])}</li>' in html


def test_arms_use_the_right_weights(setup):
    """base arm = base model with the adapter off; finetuned arm = the run; same greedy decoding."""
    tmp, _, proc = setup
    assert proc.returncode == 0
    res = json.loads((tmp / "run" / "compare" / "results.json").read_text())
    rows = [r for r in res["answers"] if r["split"] == "seen"]
    convs = [
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": r["question"]}] for r in rows
    ]
    tuned, tok, _ = load_for_inference(str(tmp / "run"))
    assert generate_batch(tuned, tok, convs, max_new_tokens=6) == [r["finetuned"] for r in rows]
    base, base_tok, _ = load_for_inference(yaml.safe_load((tmp / "c.yaml").read_text())["model"]["name"])
    assert generate_batch(base, base_tok, convs, max_new_tokens=6) == [r["base"] for r in rows]


def test_rerun_on_finished_run_with_arm_subset(setup):
    tmp, cfg, _ = setup
    stamp = (tmp / "run" / "run.json").stat().st_mtime_ns
    out = tmp / "subset"
    proc = cli(
        "compare",
        str(cfg),
        f"compare.run={tmp / 'run'}",
        "compare.arms=[base,rag]",
        f"compare.output_dir={out}",
        "compare.general_questions=",
        "compare.general_text=",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp / "run" / "run.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert f"reusing run {tmp / 'run'}" in proc.stdout  # and it says so
    res = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in res["arms"]] == ["base", "rag"] and res["forgetting"] is None
    assert [s["name"] for s in res["splits"]] == ["seen", "doc_only"]
    seen = res["recommendations"]["splits"]["seen"]
    assert seen["not_run"] == ["prompt", "finetuned", "finetuned_rag"] and set(seen["tied"]) <= {"base", "rag"}
    assert "Not run: Prompt engineering, Fine-tuned, Fine-tuned + RAG." in seen["sentence"]


def test_bad_input_one_line_exit_2_and_results_untouched(setup, tmp_path, capsys):
    """Through the CLI's own entry point in-process (a subprocess per case costs seconds of imports)."""
    from tunesmith.cli import main

    tmp, cfg, _ = setup
    results = tmp / "run" / "compare" / "results.json"
    before = results.read_bytes()
    (tmp_path / "empty").mkdir()
    (tmp_path / "noadapter").mkdir()
    (tmp_path / "noadapter" / "tunesmith.yaml").write_text("model:\n  name: x\n")
    bad_q = _questions(tmp_path / "noans.jsonl", [{"question": "Q?", "answer": "A"}, {"question": "Q2?"}])
    bad_f = _questions(
        tmp_path / "facts.jsonl",
        [{"question": "a", "answer": "X", "fact_id": "f1"}, {"question": "b", "answer": "Y", "fact_id": "f1"}],
    )
    cases = [
        ([f"compare.questions={bad_q}"], "noans.jsonl:2: question has no answer"),
        ([f"compare.documents={tmp_path / 'empty'}"], "holds no .txt, .md or .jsonl"),
        ([f"compare.run={tmp_path / 'noadapter'}"], "has no adapter"),
        (["compare.arms=[base,finetuned,oracle]"], "compare.arms: expected one of"),
        ([f"compare.questions={bad_f}"], "facts.jsonl:2: fact ids do not match"),
    ]
    for overrides, words in cases:
        code = main(["compare", str(cfg), *overrides])
        err = capsys.readouterr().err
        assert code == 2, (overrides, err)
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert results.read_bytes() == before


def test_user_style_questions_guessing_audit_and_progress(tmp_path, tiny_model_dir):
    """A user's own question file (identifiers, punctuation answers, an answer inside its question,
    its own split names mapped with compare.splits) through the real CLI with the base and prompt
    arms: flagged echoes, majority rows, exact prompts, a progress bar per arm on stderr."""
    from tests.unit.test_compare_scoring import MAPPING, QUESTIONS
    from tunesmith.eval.questions import load_questions
    from tunesmith.eval.scoring import score_results

    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        train={"progress": True},
        compare={
            "questions": str(QUESTIONS),
            "arms": ["base", "prompt"],
            "general_questions": "",
            "general_text": "",
            "max_new_tokens": 4,
            "latency_samples": 1,
            "bootstrap": 100,
            "k_shot": 2,
            "output_dir": str(tmp_path / "out"),
            "threads": 1,
        },
    )
    proc = cli("compare", str(cfg))
    assert proc.returncode == 2 and "unknown split 'trained'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    proc = cli("compare", str(cfg), "compare.splits={trained: seen, docs: doc_only}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = [line for line in proc.stderr.splitlines() if "hold their own answer" in line]
    assert len(warned) == 1 and "stdlib_questions.jsonl:7" in warned[0] and "stdlib_questions.jsonl:9" in warned[0]
    for arm in ("base", "prompt"):  # tqdm's bar: answers done/total, rate
        assert f"compare {arm}: 100%" in proc.stderr and "10/10" in proc.stderr and "answer/s" in proc.stderr
    assert "loading model" in proc.stdout and "9 questions (seen 5, doc_only 4)" in proc.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["settings"]["threads"] == 1
    assert res["answer_in_question"] == [f"{QUESTIONS}:7", f"{QUESTIONS}:9"]
    assert res["baselines"]["guesses"]["majority"][7] == "True"  # pprint's sort_dicts: the other "what is" facts
    # the scores are the scoring entry point's on the recorded replies (the hand-computed rules)
    questions = load_questions(QUESTIONS, splits=MAPPING)
    replies = {a: [row[a] for row in res["answers"]] for a in ("base", "prompt")}
    again = score_results(questions, replies, 100, 0)
    assert res["scores"] == again["scores"] and res["baselines"] == again["baselines"]
    assert {r["arm"] for r in res["baselines"]["rows"]} == {"majority", "base_majority"}
    assert len(res["audit"]["prompts"]) == 6 and res["audit"]["retrieval"] is None
    assert "above guessing" in (tmp_path / "out" / "report.html").read_text()
