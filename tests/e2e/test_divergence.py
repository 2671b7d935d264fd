"""Divergence through the real CLI on the tiny model: lr=1e30 (NaN from step 2), a collapse to
ln(vocab) with zero gradient, and skip_step counting. Each ends with exit 3, one line naming the
step, and the last good checkpoint complete, finite and loadable."""

import json
import math
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.io import manifest_problem

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")


def train(cfg, tmp_path, *extra):
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([EXE, "train", str(cfg), *extra], env=env, capture_output=True, text=True, timeout=300)


def steps(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_good(ckpt):
    assert manifest_problem(ckpt) is None
    state = json.loads((ckpt / "state.json").read_text())
    assert state["healthy"] is True and math.isfinite(state["last_loss"])
    for name, t in load_file(ckpt / "trainable.safetensors").items():
        assert torch.isfinite(t).all(), name


def test_lr_1e30_stops_at_step_2_and_keeps_step_1(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    out = tmp_path / "run"
    train_cfg = {"lr": 1e30, "save_every": 1, "keep_last": 1, "max_steps": 8}
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, train=train_cfg)
    proc = train(cfg, tmp_path, "--force")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "training diverged at step 2: the loss is nan" in lines[0]
    assert str(out / "checkpoints" / "step-00000001") in lines[0]
    assert "done" not in proc.stdout and not (out / "run.json").exists()
    assert steps(out) == ["step-00000001"]
    assert_good(out / "checkpoints" / "step-00000001")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["update"] == "stop"
    # loadable: the same run resumes from it (and diverges again at the same step, deterministically)
    again = train(cfg, tmp_path, "--force", "--resume")
    assert "resuming at step 1" in again.stdout and again.returncode == 3, again.stderr


def test_collapse_stops_and_pruning_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    """Two healthy steps, then the base model's embeddings are zeroed under the run (a forced
    collapse: every logit 0, loss = ln(vocab), gradient exactly 0): steps 3-5 collapse, the run
    stops at step 5; keep_last=1 keeps the newest (unhealthy) checkpoint and the last good one."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    out = tmp_path / "run"
    settings = {"save_every": 1, "keep_last": 1, "max_steps": 2}
    cfg = write_config(tmp_path / "c.yaml", base, data, out, train=settings)
    assert train(cfg, tmp_path, "--force").returncode == 0

    weights = load_file(base / "model.safetensors")
    (name,) = [n for n in weights if "embed_tokens" in n]
    weights[name] = torch.zeros_like(weights[name])
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    proc = train(cfg, tmp_path, "train.max_steps=10", "--force", "--resume")
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "training diverged at step 5" in line and "ln(vocab)" in line, line
    assert str(out / "checkpoints" / "step-00000002") in line
    assert steps(out) == ["step-00000002", "step-00000004"]
    assert json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())["healthy"] is False
    assert_good(out / "checkpoints" / "step-00000002")
    # a resume passes over the collapsed checkpoint, saying so, and starts from the good one
    again = train(cfg, tmp_path, "train.max_steps=10", "--force", "--resume")
    assert "skipping" in again.stdout and "step-00000004 (saved while the run was diverging)" in again.stdout
    assert "resuming at step 2" in again.stdout and again.returncode == 3


def test_skip_step_drops_updates_counts_them_and_stops_after_the_limit(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    out = tmp_path / "run"
    settings = {"lr": 1e30, "save_every": 1, "keep_last": 2, "max_steps": 8}
    settings.update(on_divergence="skip_step", max_skipped_steps=2)
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, train=settings)
    proc = train(cfg, tmp_path, "--force")
    assert proc.returncode == 3, proc.stderr
    assert "at step 4" in proc.stderr and "train.max_skipped_steps=2" in proc.stderr
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("update", "ok") for r in rows] == ["ok", "skip", "skip", "stop"]
    # keep_last=2 keeps steps 2 and 3 (saved after dropped updates: not healthy) and step 1, the last good one
    ck = out / "checkpoints"
    assert steps(out) == ["step-00000001", "step-00000002", "step-00000003"]
    assert_good(ck / "step-00000001")
    state = json.loads((ck / "step-00000003" / "state.json").read_text())
    assert state["skipped_steps"] == 2 and state["healthy"] is False
    # a dropped update leaves the weights as they were: steps 2 and 3 hold step 1's weights
    first = load_file(ck / "step-00000001" / "trainable.safetensors")
    for later in ("step-00000002", "step-00000003"):
        w = load_file(ck / later / "trainable.safetensors")
        assert all(torch.equal(first[n], w[n]) for n in first)


def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path, tiny_model_dir):
    """Two gloo processes: both see the NaN of step 2 (the loss is all-reduced, and so is the
    verdict), both stop there with the one line, nobody hangs in a collective, and rank 0 alone
    wrote the checkpoint of step 1."""
    from tests.e2e.test_torchrun import torchrun

    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, train={"lr": 1e30, "save_every": 1})
    proc = torchrun(cfg, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("training diverged at step 2: the loss is nan") == 2, proc.stderr[-3000:]
    assert steps(out) == ["step-00000001"]
    assert_good(out / "checkpoints" / "step-00000001")
