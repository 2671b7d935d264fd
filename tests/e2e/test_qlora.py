"""QLoRA end to end on a tiny Llama: it learns, its adapter is a plain PEFT LoRA adapter that
loads and merges on the unquantized base, and a resumed run ends bit-identical."""

import json
import shutil

import torch
from safetensors.torch import load_file

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.adapters.methods import compress_base
from tunesmith.config import load_config
from tunesmith.export.merge import merge_run
from tunesmith.train.loop import run_training

SETTINGS = dict(
    adapter={"method": "qlora", "rank": 8, "alpha": 32, "quant_block_size": 32, "dropout": 0.1},  # dropout: RNG matters
    data={"val_fraction": 0.2},
    train={"max_steps": 16, "save_every": 4, "eval_every": 4, "lr": 3e-2, "progress": False},
)


def logits_of(model, tokenizer, text="What is the answer 3?"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_qlora_trains_saves_a_peft_adapter_and_merges(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out", **SETTINGS))
    result = run_training(cfg)
    out = result.output_dir
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    # (dropout draws differ between padded and padding-free batches, so the trajectory does too)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05 and val[-1] < val[0], (losses, val)
    summary = json.loads((out / "run.json").read_text())
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert summary["method"] == "qlora" and summary["total_params"] == n_base + summary["trainable_params"]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and not adapter_cfg["use_dora"]

    # on the same NF4 base, the saved adapter reproduces the trained model exactly
    trained = logits_of(result.model, result.tokenizer)
    nf4_base = compress_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg.adapter)
    again = PeftModel.from_pretrained(nf4_base, str(out)).eval()
    torch.testing.assert_close(logits_of(again, result.tokenizer), trained, rtol=0, atol=1e-6)

    # on the unquantized fp32 base it loads as any LoRA adapter, and stays close to the trained model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    on_fp32 = logits_of(plain, result.tokenizer)
    before = logits_of(base, result.tokenizer)
    assert (on_fp32 - trained).abs().max() < 0.5 * (before - trained).abs().max()

    merged_dir = merge_run(out)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(logits_of(merged, result.tokenizer), on_fp32, rtol=0, atol=1e-5)


def test_qlora_resume_is_bit_exact(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    settings = {**SETTINGS, "train": {**SETTINGS["train"], "keep_last": 10}}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out", **settings))
    out = run_training(cfg).output_dir
    reference = load_file(out / "adapter_model.safetensors")
    # as if the process died right after the step-8 checkpoint: later checkpoints and the
    # finished adapter never got written
    for name in ("step-00000012", "step-00000016"):
        shutil.rmtree(out / "checkpoints" / name)
    for name in ("adapter_model.safetensors", "adapter_config.json", "run.json"):
        (out / name).unlink()
    result = run_training(load_config(tmp_path / "c.yaml", ["train.resume=auto"]))
    assert json.loads((out / "run.json").read_text())["steps"] == 16
    resumed = load_file(out / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys() and len(reference) == 28
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), f"{name} differs after resume"
    assert result.summary["final_val_loss"] is not None


def test_bf16_frozen_base_run_loads_in_bf16_and_saves_a_plain_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            tiny_model_dir,
            data,
            tmp_path / "out",
            adapter={"method": "qlora", "quant_block_size": 32},
            train={"max_steps": 3, "frozen_dtype": "bf16"},
        )
    )
    result = run_training(cfg)
    inner = result.model.get_base_model()
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # norms upcast, adapters fp32
    assert inner.get_input_embeddings().storage.data.dtype == torch.bfloat16
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.output_dir))
    assert torch.isfinite(logits_of(loaded.eval(), result.tokenizer)).all()
