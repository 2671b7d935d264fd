"""End-to-end training on a tiny real Llama: outputs, PEFT/HF round-trips, loss going down."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.config import load_config
from tunesmith.train.loop import run_training


def logits_of(model, tokenizer, text="What is the answer 3?"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_roundtrip_through_peft(tmp_path, tiny_model_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    cfg_path = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out", adapter={"method": method})
    result = run_training(load_config(cfg_path))
    out = result.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tunesmith.yaml",
        "metrics.jsonl",
        "loss.png",
        "run.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    expected = logits_of(result.model, result.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = logits_of(base, result.tokenizer)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    got = logits_of(loaded, result.tokenizer)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(before, expected, atol=1e-4)  # training changed the model
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is (method == "dora")


def test_full_finetune_writes_hf_dir(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    cfg_path = write_config(
        tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out", adapter={"method": "full"}, train={"lr": 1e-3}
    )
    result = run_training(load_config(cfg_path))
    assert (result.output_dir / "model.safetensors").is_file()
    assert not (result.output_dir / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    assert torch.allclose(logits_of(loaded, result.tokenizer), logits_of(result.model, result.tokenizer), atol=1e-6)
    summary = json.loads((result.output_dir / "run.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]


def test_cli_train_learns_and_logs(tmp_path, tiny_model_dir):
    """The real console script: loss falls, one metrics row per step, validation rows.

    Full fine-tuning here: LoRA on a 32-wide random model barely moves in 40 steps (the slow
    SmolLM2 tier shows LoRA learning)."""
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    out = tmp_path / "out"
    cfg_path = write_config(
        tmp_path / "c.yaml",
        tiny_model_dir,
        data,
        out,
        adapter={"method": "full"},
        data={"val_fraction": 0.25},
        train={"max_steps": 40, "lr": 5e-3, "eval_every": 20, "save_every": 20},
    )
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home")}
    exe = os.path.join(os.path.dirname(sys.executable), "tunesmith")
    proc = subprocess.run(
        [exe, "train", str(cfg_path), "train.weight_decay=0.01"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert len(val_rows) == 2  # step 20 and the end
    first = sum(r["loss"] for r in train_rows[:5]) / 5
    last = sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert load_config(out / "tunesmith.yaml").train.weight_decay == 0.01  # the override was applied
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 40 and summary["peak_rss_mib"] > 0 and summary["val_rows"] > 0
