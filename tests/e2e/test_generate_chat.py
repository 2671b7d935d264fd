"""`tunesmith generate` and `tunesmith chat` through the real console script on a tiny model."""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.config import load_config
from tunesmith.infer.generate import generate_batch
from tunesmith.train.loop import run_training

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("gen")
    data = write_qa_jsonl(tmp / "qa.jsonl")
    cfg = write_config(
        tmp / "c.yaml",
        tiny_model_dir,
        data,
        tmp / "out",
        data={"system_prompt": "Answer briefly.", "cache_dir": str(tmp / "cache")},
    )
    return run_training(load_config(cfg))


def cli(*args, stdin=None):
    return subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_file_matches_library(tmp_path, run_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"What is the answer {i}?"}) for i in range(5)) + "\n")
    out = tmp_path / "answers.jsonl"
    proc = cli("generate", str(run_dir.output_dir), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"What is the answer {i}?" for i in range(5)]
    # the CLI used the run's adapter and system prompt: same greedy text as the library call
    convs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": r["prompt"]}] for r in rows]
    expected = generate_batch(run_dir.model, run_dir.tokenizer, convs, max_new_tokens=8, batch_size=2)
    assert [r["response"] for r in rows] == expected
    assert cli("generate", str(run_dir.output_dir), "--file", str(prompts), "--out", str(out)).returncode == 2


def test_batched_equals_one_by_one(run_dir):
    convs = [[{"role": "user", "content": q}] for q in ("Hi", "What is the answer 12 today?", "Who founded it?")]
    batched = generate_batch(run_dir.model, run_dir.tokenizer, convs, max_new_tokens=6, batch_size=3)
    single = [generate_batch(run_dir.model, run_dir.tokenizer, [c], max_new_tokens=6)[0] for c in convs]
    assert batched == single  # left padding must not change greedy answers


def test_generate_base_model_dir(tiny_model_dir):
    from tunesmith.infer.load import load_for_inference

    proc = cli("generate", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "6", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    model, tok, _ = load_for_inference(str(tiny_model_dir))
    expected = generate_batch(model, tok, [[{"role": "user", "content": "hello"}]], max_new_tokens=6)[0]
    assert proc.stdout == expected + "\n"


def test_generate_threads_must_not_be_negative(tiny_model_dir, capsys):
    from tunesmith.cli import main

    assert main(["generate", str(tiny_model_dir), "--prompt", "hi", "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--threads: expected an integer >= 0" in err and len(err.strip().splitlines()) == 1


def test_generate_in_bf16_weights(run_dir):
    """`--precision bf16` loads base and adapter for bf16 matmuls: the library's answer with the same weights."""
    import torch

    from tunesmith.infer.load import load_for_inference

    proc = cli(
        "generate",
        str(run_dir.output_dir),
        "--prompt",
        "What is the answer 3?",
        "--max-new-tokens",
        "6",
        "--precision",
        "bf16",
    )
    assert proc.returncode == 0, proc.stderr
    model, tok, _ = load_for_inference(str(run_dir.output_dir), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    conv = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the answer 3?"}]
    assert proc.stdout == generate_batch(model, tok, [conv], max_new_tokens=6)[0] + "\n"
    bad = cli("generate", str(run_dir.output_dir), "--prompt", "hi", "--precision", "fp16")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--precision" in bad.stderr


def test_chat_streams_and_exits(run_dir):
    proc = cli("chat", str(run_dir.output_dir), "--max-new-tokens", "5", stdin="hello\n/reset\nagain\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 2
    assert "tunesmith chat" in proc.stdout
