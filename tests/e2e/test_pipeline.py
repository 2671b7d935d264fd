"""`tunesmith pipeline` through the real CLI: stages feed each other, a SIGKILL mid-stage resumes
that stage from its checkpoint, finished stages are skipped, `--from` reruns from a stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.tiny import write_qa_jsonl
from tunesmith.cli import main

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")
CORPUS = Path(__file__).resolve().parents[2] / "tunesmith" / "resources" / "corpus" / "texts"


def pipeline_config(tmp_path: Path, root: Path, **pipeline) -> Path:
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    cfg = {
        "pretrain": {
            "corpus": [str(CORPUS)],
            "from_scratch": True,
            "hidden_size": 32,
            "layers": 2,
            "heads": 4,
            "intermediate_size": 64,
            "vocab_size": 400,
            "block_size": 32,
            "max_steps": 10,
            "lr": 3e-2,
            "batch_size": 16,
        },
        "data": {"train": [str(data)], "format": "messages", "max_length": 64},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8},
        "train": {"max_steps": 40, "save_every": 2, "keep_last": 2, "batch_size": 2, "lr": 1e-2, "progress": False},
        "pipeline": {
            "output_dir": str(root),
            "stages": ["pretrain", "finetune", "merge", "export"],
            "export_quants": ["q8_0"],
            "verify": False,
            **pipeline,
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: Path, env, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "pipeline", str(cfg), *extra], env=env, capture_output=True, text=True, timeout=600)


def test_killed_pipeline_resumes_at_the_stage_and_step_where_it_stopped(tmp_path):
    root = tmp_path / "pipe"
    cfg = pipeline_config(tmp_path, root)
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [EXE, "pipeline", str(cfg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ckpts = root / "finetune" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-00000004").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((root / "pipeline.json").read_text())
    assert state["pretrain"]["done"] and not state["finetune"]["done"], "killed outside the fine-tune stage"
    assert "merge" not in state and not (root / "finetune" / "run.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert 4 <= killed_at < 40

    resumed = run(cfg, env)
    assert resumed.returncode == 0, resumed.stderr
    assert "pretrain already done" in resumed.stdout
    assert "resuming finetune" in resumed.stdout and f"resuming at step {killed_at}" in resumed.stdout
    assert json.loads((root / "finetune" / "run.json").read_text())["steps"] == 40
    assert (root / "merged" / "model.safetensors").is_file()
    gguf = root / "export" / "model-q8_0.gguf"
    assert gguf.is_file()
    # the merged model is the from-scratch model plus the fine-tune: transformers loads it
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(root / "merged").config.hidden_size == 32

    again = run(cfg, env)
    assert again.returncode == 0, again.stderr
    for stage in ("pretrain", "finetune", "merge", "export"):
        assert f"{stage} already done" in again.stdout
    stamp = gguf.stat().st_mtime_ns
    merged_stamp = (root / "merged" / "model.safetensors").stat().st_mtime_ns

    redo = run(cfg, env, "--from", "export")
    assert redo.returncode == 0, redo.stderr
    assert "merge already done" in redo.stdout and "export already done" not in redo.stdout
    assert gguf.stat().st_mtime_ns != stamp
    assert (root / "merged" / "model.safetensors").stat().st_mtime_ns == merged_stamp

    # a changed export setting reruns export only, not the training stages
    changed = run(cfg, env, "pipeline.export_quants=[f16]")
    assert changed.returncode == 0, changed.stderr
    assert "finetune already done" in changed.stdout and (root / "export" / "model-f16.gguf").is_file()


def test_a_stage_whose_input_is_missing_exits_2(tmp_path, capsys):
    cfg = pipeline_config(tmp_path, tmp_path / "pipe")
    code = main(["pipeline", str(cfg), "--from", "merge"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "stage pretrain has not finished" in err
    code = main(["pipeline", str(cfg), "pipeline.stages=[merge,export]", "--from", "finetune"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--from: finetune is not a stage of this pipeline" in err


def test_pipeline_compare_stage_compares_the_fine_tuned_run(tmp_path, tiny_model_dir, capsys):
    """finetune → compare from one config: the compare stage gets the fine-tune dir as its run."""
    root = tmp_path / "pipe"
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question": f"What is the answer {i}?", "answer": "Quell", "fact_id": f"f{i}"}) + "\n"
            for i in range(4)
        )
    )
    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": [str(data)], "max_length": 64},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "progress": False},
        "compare": {
            "questions": str(questions),
            "arms": ["base", "finetuned"],
            "general_questions": "",
            "general_text": "",
            "max_new_tokens": 4,
            "latency_samples": 1,
            "bootstrap": 50,
        },
        "pipeline": {"output_dir": str(root), "stages": ["finetune", "compare"]},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(path)]) == 0, capsys.readouterr().err
    results = json.loads((root / "compare" / "results.json").read_text())
    assert results["model"]["run"] == str(root / "finetune")
    state = json.loads((root / "pipeline.json").read_text())
    assert state["compare"]["done"] and set(state["compare"]["summary"]["contains"]) == {"base", "finetuned"}
