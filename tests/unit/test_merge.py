"""`tunesmith merge`: a LoRA/DoRA run folded into its base equals base + adapter; bad runs refused."""

import shutil

import pytest
import torch

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.export.merge import merge_run
from tunesmith.train.loop import run_training

TEXT = "<|im_start|>user\nWhat is the answer 3?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One short LoRA and one DoRA run on the tiny model, shared by this module's tests."""
    root = tmp_path_factory.mktemp("merge-runs")
    data = write_qa_jsonl(root / "qa.jsonl")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(root / "home"))
        for method in ("lora", "dora"):
            cfg = write_config(
                root / f"{method}.yaml",
                tiny_model_dir,
                data,
                root / method,
                adapter={"method": method},
                train={"max_steps": 3},
                data={"system_prompt": "Answer briefly."},
            )
            out[method] = run_training(load_config(cfg)).output_dir
    return out


def logits(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_equals_base_plus_adapter(tmp_path, runs, tiny_model_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs[method]
    out = merge_run(run, tmp_path / "merged")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tunesmith.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = logits(base, tokenizer)
    expected = logits(PeftModel.from_pretrained(base, str(run)).eval(), tokenizer)
    got = logits(merged, tokenizer)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(before, expected, atol=1e-4)  # the adapter did change the model
    assert not list(tmp_path.glob(".merged.tmp-*"))  # nothing left behind


def test_nan_in_adapter_is_refused(tmp_path, runs):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    weights = load_file(run / "adapter_model.safetensors")
    bad = sorted(k for k in weights if "lora_B" in k)[0]
    weights[bad][0, 0] = float("nan")
    save_file(weights, run / "adapter_model.safetensors")
    with pytest.raises(UserError, match="NaN/inf") as err:
        merge_run(run, tmp_path / "merged")
    # the message names the tensor (PEFT's in-memory name of the same weight)
    assert bad.split(".")[-4] in str(err.value) and "lora_B" in str(err.value), str(err.value)
    assert not (tmp_path / "merged").exists()


def test_overwrite_needs_force(tmp_path, runs, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["merge", str(runs["lora"]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--force" in err, err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(runs["lora"]), "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_default_out_dir(tmp_path, runs):
    run = tmp_path / "myrun"
    shutil.copytree(runs["lora"], run)
    assert merge_run(run) == tmp_path / "myrun-merged"


def test_not_an_adapter_run(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="already a full model.*tunesmith export"):
        merge_run(tiny_model_dir, tmp_path / "merged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter"):
        merge_run(tmp_path / "empty", tmp_path / "merged")
    with pytest.raises(UserError, match="not found"):
        merge_run(tmp_path / "missing", tmp_path / "merged")


def test_truncated_adapter_is_one_line(tmp_path, runs, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["merge", str(run), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "adapter_model.safetensors" in err, err
    assert "Traceback" not in err and not (tmp_path / "merged").exists()
