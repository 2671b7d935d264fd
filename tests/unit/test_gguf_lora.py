"""`tunesmith export RUN --adapter`: the LoRA alone as a llama.cpp GGUF LoRA, loaded over a base GGUF.

The adapters here have random (non-zero) B, so base + adapter differs from the base by about the
logits' own size; llama.cpp running base + adapter must give the merged PyTorch model's logits
(f32 base) and the merged export's greedy tokens (f16 base). A wrong q/k permutation of B, a
transposed A or a wrong alpha/rank scale breaks the first check by orders of magnitude.
"""

import json

import llama_cpp
import numpy as np
import pytest
import torch

from tests.tiny import make_tokenizer
from tests.unit.test_gguf_export import fields, make_model_dir, one_line_error
from tests.unit.test_gguf_kquant import make_wide_model_dir
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.export.gguf import export_gguf
from tunesmith.export.lora_gguf import export_adapter
from tunesmith.export.merge import load_merged
from tunesmith.export.verify import PROMPTS, chat_prompt, end_ids, llama_greedy, open_gguf

PROMPT = "<|im_start|>user\nWhat is the capital of Zorbia?<|im_end|>\n<|im_start|>assistant\nThe capital"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_run(path, base_dir, seed=1, **lora):
    """A PEFT LoRA adapter dir (what `tunesmith train` leaves) with random B, over `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS} | lora
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**settings))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def llama(path, lora=None, n_ctx=64):
    return llama_cpp.Llama(
        model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, logits_all=True, verbose=False
    )


def logits(path, ids, lora=None):
    llm = llama(path, lora)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.fixture(scope="module")
def base64(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("base64"))


@pytest.mark.parametrize(
    "arch,lora",
    [
        ("llama", {}),
        ("llama", {"use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
        ("qwen2", {}),
    ],
)
def test_base_plus_adapter_is_the_merged_model(tmp_path, base64, arch, lora):
    base_dir = base64 if arch == "llama" else make_model_dir(tmp_path / "qwen2", arch="qwen2")
    run = make_lora_run(tmp_path / "run", base_dir, **lora)
    adapter, base, modelfile = export_adapter(str(run), base_quant="f32")
    assert (adapter, base) == (run / "export" / "adapter.gguf", run / "export" / "base-f32.gguf")

    meta, tensors = fields(adapter)
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", arch)
    assert meta["adapter.lora.alpha"] == 8.0
    _, base_tensors = fields(base)
    rank = 2 if lora.get("rank_pattern") else 4
    a, b, w = (
        tensors["blk.1.attn_k.weight.lora_a"],
        tensors["blk.1.attn_k.weight.lora_b"],
        base_tensors["blk.1.attn_k.weight"],
    )
    assert list(a.shape) == [w.shape[0], rank] and list(b.shape) == [rank, w.shape[1]]  # GGUF: innermost dim first
    assert len(tensors) == 2 * len(TARGETS) * 2 and all(t.tensor_type.name == "F32" for t in tensors.values())

    ids = make_tokenizer()(PROMPT)["input_ids"]
    merged, _ = load_merged(str(run))
    with torch.no_grad():
        want = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    got, plain = logits(base, ids, adapter), logits(base, ids)
    scale = np.abs(want).max()
    assert np.abs(plain - want).max() > 0.2 * scale  # the adapter matters
    assert np.abs(got - want).max() < 1e-3 * scale

    text = modelfile.read_text()
    assert text.startswith("FROM ./base-f32.gguf\nADAPTER ./adapter.gguf\nTEMPLATE ")
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_cli_adapter_f16_matches_the_merged_export(tmp_path, base64, capsys):
    run = make_lora_run(tmp_path / "run", base64)
    assert main(["export", str(run), "--adapter"]) == 0  # base at f16 by default, verified
    export = run / "export"
    adapter, base = export / "adapter.gguf", export / "base-f16.gguf"
    printed = capsys.readouterr().out
    assert str(adapter) in printed and "gguf f16 + LoRA" in printed
    report = json.loads((export / "adapter.report.json").read_text())
    assert report["passed"] and report["thresholds"] == {"min_greedy_fraction": 0.9}
    assert report["verification"]["greedy_match"] >= 9

    merged = export_gguf(str(run), tmp_path / "merged-f16.gguf", quant="f16")
    tok = make_tokenizer()
    stops = end_ids(tok) | {tok.convert_tokens_to_ids("<|im_end|>")}
    same = 0
    with_lora, whole = llama(base, adapter, n_ctx=128), llama(merged, n_ctx=128)
    try:
        for question in PROMPTS:
            ids = tok(chat_prompt(tok, question), add_special_tokens=False)["input_ids"]
            same += llama_greedy(with_lora, ids, stops) == llama_greedy(whole, ids, stops)
    finally:
        with_lora.close()
        whole.close()
    assert same >= 9

    before = adapter.read_bytes()
    err = one_line_error(capsys, "export", str(run), "--adapter")  # exists: refused, untouched
    assert "--force" in err and adapter.read_bytes() == before
    adapter.unlink()
    base_time = base.stat().st_mtime_ns
    assert main(["export", str(run), "--adapter", "--no-verify"]) == 0  # the base GGUF is reused
    assert base.stat().st_mtime_ns == base_time and adapter.read_bytes() == before

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(before[: len(before) // 2])
    with pytest.raises(UserError, match="cut.gguf"):
        open_gguf(base, 64, lora_path=cut)


def test_refusals_write_nothing(tmp_path, base64, capsys):
    dora = make_lora_run(tmp_path / "dora", base64, use_dora=True)
    assert "DoRA" in one_line_error(capsys, "export", str(dora), "--adapter")
    embed = make_lora_run(tmp_path / "embed", base64, target_modules=["embed_tokens", "q_proj"])
    assert "embed_tokens" in one_line_error(capsys, "export", str(embed), "--adapter")
    saved = make_lora_run(tmp_path / "saved", base64, modules_to_save=["lm_head"])
    assert "modules_to_save" in one_line_error(capsys, "export", str(saved), "--adapter")
    assert "full" in one_line_error(capsys, "export", str(base64), "--adapter")
    assert "LoRA run" in one_line_error(capsys, "export", str(tmp_path), "--adapter")
    for run in (dora, embed, saved, base64):
        assert not (run / "export").exists()

    other = make_lora_run(tmp_path / "other", base64)
    stranger = make_wide_model_dir(tmp_path / "wide")
    export_gguf(str(stranger), other / "export" / "base-f16.gguf", quant="f16")
    err = one_line_error(capsys, "export", str(other), "--adapter")
    assert "not this run's base" in err and not (other / "export" / "adapter.gguf").exists()
