"""`tunesmith fit` and the fit check inside `tunesmith train`, through the real CLI."""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny import write_config, write_qa_jsonl


def cli(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *map(str, args)], capture_output=True, text=True, env=full_env
    )


def test_fit_prints_table_and_json(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, write_qa_jsonl(tmp_path / "qa.jsonl"), tmp_path / "out")
    res = cli("fit", cfg, "train.batch_size=3", "--json", tmp_path / "fit.json")
    assert res.returncode == 0, res.stderr
    assert "peak RSS (predicted)" in res.stdout and "s/step" in res.stdout and "fits:" in res.stdout
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["fits"] and report["step_s"] > 0 and report["tokens_per_step"] == 3 * 64
    assert set(report["parts"]) >= {"baseline", "weights", "gradients", "optimizer", "activations"}
    assert report["warnings"] == [] and "warning:" not in res.stdout + res.stderr
    assert not (tmp_path / "out").exists()  # fit writes nothing into the run dir
    assert report["total_steps"] == 6 and report["total_s"] == pytest.approx(6 * report["step_s"], abs=0.1)
    assert "total: 6 steps × " in res.stdout  # train.max_steps=6
    # without max_steps: the loop's count, 24 examples packed into 12 rows of 64, batch 2, 2 epochs
    res = cli("fit", cfg, "train.max_steps=0", "train.epochs=2", "--no-probe", "--ram-gib", "0.01")
    assert res.returncode == 1 and "does not fit: predicted peak RAM" in res.stdout
    assert "total: 12 steps (time not probed)" in res.stdout


def test_fit_says_bf16_is_emulated(tmp_path, tiny_model_dir):
    """The suite pins no bf16 matmul units: bf16 asked for warns once on stderr and in the report."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, write_qa_jsonl(tmp_path / "qa.jsonl"), tmp_path / "out")
    res = cli("fit", cfg, "train.precision=bf16", "--no-probe", "--json", tmp_path / "fit.json")
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if line.startswith("tunesmith: warning:")]
    assert len(warned) == 1 and "train.precision=bf16" in warned[0] and "emulated" in warned[0]
    (note,) = json.loads((tmp_path / "fit.json").read_text())["warnings"]
    assert note.startswith("train.precision=bf16: ") and f"warning: {note}" in res.stdout


def test_train_refuses_what_cannot_fit_unless_forced(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # one exact duplicate
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out", train={"max_steps": 2})
    res = cli("train", cfg, env={"TUNESMITH_RAM_GIB": "0.01"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunesmith: error: predicted peak RAM") and "--force" in lines[0]
    assert not (tmp_path / "out").exists()
    res = cli("train", cfg, "--force", env={"TUNESMITH_RAM_GIB": "0.01"})
    assert res.returncode == 0, res.stderr
    assert "tunesmith: data: 1 exact duplicates, e.g. " in res.stdout and "tunesmith: fit:" not in res.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
