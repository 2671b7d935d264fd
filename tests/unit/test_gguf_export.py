"""`tunesmith export --format gguf`: written with the `gguf` package, read back by `gguf` and `transformers`.

transformers' GGUF loader undoes llama.cpp's q/k row permutation, so f32 logits matching the
original model within 1e-4 proves the permutation (and every tensor name) is right.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import make_tokenizer, write_config, write_qa_jsonl
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.export.gguf import encode_tensor, export_gguf, ollama_template, permute_rotary

TEXTS = ["Hello world", "<|im_start|>user\nWhat is 333?<|im_end|>\n", "  two spaces\n\nnew lines, 🚀 and ümlaut"]
PROMPT = "<|im_start|>user\nWhat is the capital of Zorbia?<|im_end|>\n<|im_start|>assistant\nThe capital"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_model_dir(path, arch="llama", tie=True, seed=0):
    """Hidden 64, head_dim 16: every matrix row is a whole number of 32-wide quant blocks."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = model_cls(cfg).float().eval()
    if arch == "qwen2":  # random-init biases are zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llama64"))


def logits_of(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_f32_roundtrip(tmp_path, model64):
    from gguf import GGMLQuantizationType, TokenType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(str(model64), tmp_path / "m.gguf", quant="f32")
    meta, tensors = fields(out)
    tok = AutoTokenizer.from_pretrained(model64)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (
        2,
        64,
        128,
    )
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.context_length"] == 256 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.vocab_size"] == len(tok) == len(meta["tokenizer.ggml.tokens"])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.bos_token_id"] == tok.convert_tokens_to_ids("<|im_start|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_end|>")] == TokenType.CONTROL
    assert meta["tokenizer.ggml.token_type"][300] == TokenType.NORMAL
    assert len(meta["tokenizer.ggml.merges"]) > 0 and " " in meta["tokenizer.ggml.merges"][0]
    assert "output.weight" not in tensors and "token_embd.weight" in tensors  # tied: written once
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors.values())

    original = AutoModelForCausalLM.from_pretrained(model64).eval()
    loaded = load_gguf(out)
    assert torch.allclose(logits_of(loaded, tok), logits_of(original, tok), atol=1e-4, rtol=0)
    gguf_tok = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in TEXTS:
        assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))


@pytest.mark.parametrize("quant,qtype,bound", [("f16", "F16", None), ("q8_0", "Q8_0", 0.99), ("q4_0", "Q4_0", 0.95)])
def test_quantized(tmp_path, model64, quant, qtype, bound):
    from gguf import GGMLQuantizationType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f32 = export_gguf(str(model64), tmp_path / "f32.gguf", quant="f32")
    out = export_gguf(str(model64), tmp_path / f"{quant}.gguf", quant=quant)
    assert out.stat().st_size < f32.stat().st_size
    _, tensors = fields(out)
    for name, t in tensors.items():
        expected = GGMLQuantizationType[qtype] if len(t.shape) == 2 else GGMLQuantizationType.F32
        if quant == "q4_0" and name == "token_embd.weight":  # the tied head stays at q8_0
            expected = GGMLQuantizationType.Q8_0
        assert t.tensor_type == expected, name
    tok = AutoTokenizer.from_pretrained(model64)
    want = logits_of(AutoModelForCausalLM.from_pretrained(model64).eval(), tok)
    got = logits_of(load_gguf(out), tok)
    if bound is None:
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    else:
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > bound
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("arch,tie", [("llama", False), ("mistral", True), ("qwen2", True)])
def test_other_layouts_roundtrip(tmp_path, arch, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_model_dir(tmp_path / arch, arch=arch, tie=tie)
    out = export_gguf(str(model_dir), tmp_path / "m.gguf", quant="f32")
    meta, tensors = fields(out)
    assert meta["general.architecture"] == {"qwen2": "qwen2"}.get(arch, "llama")
    assert ("output.weight" in tensors) is (not tie)
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in tensors
    tok = AutoTokenizer.from_pretrained(model_dir)
    want = logits_of(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tok)
    assert torch.allclose(logits_of(load_gguf(out), tok), want, atol=1e-4, rtol=0)


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k = np.random.default_rng(0).normal(size=(2, 64, 64)).astype(np.float32)
    k = k[:32]
    assert np.array_equal(undo.process(permute_rotary(q, 4), "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(undo.process(permute_rotary(k, 2), "blk.0.attn_k.weight").weights, k)
    assert not np.array_equal(permute_rotary(q, 4), q)


def test_tensor_types():
    assert encode_tensor(np.ones(64), "q4_0")[0].dtype == np.float32  # norms stay f32
    assert encode_tensor(np.ones((4, 48)), "q4_0")[0].dtype == np.float16  # 48 is not a multiple of 32
    array, raw = encode_tensor(np.ones((4, 64)), "q8_0")
    assert raw.name == "Q8_0" and array.dtype == np.uint8


def render_go(template, system, prompt):
    """Just enough of Go's text/template for the templates we write: if/else on .System."""
    text = template.split("{{ .Response }}")[0]
    text = re.sub(
        r"\{\{ if \.System \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}",
        lambda m: m.group(1) if system else (m.group(2) or ""),
        text,
        flags=re.S,
    )
    return text.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt)


@pytest.mark.parametrize("chat_template", ["tiny", "smollm2"])
def test_ollama_template_renders_like_the_chat_template(chat_template):
    tok = make_tokenizer()
    if chat_template == "smollm2":
        tok.chat_template = SMOLLM2_TEMPLATE
    template, end = ollama_template(tok)
    assert end == "<|im_end|>\n" and template.endswith("{{ .Response }}<|im_end|>\n")
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi?"}]
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(template, system, "Hi?") == expected


def test_run_dir_cli_export_with_modelfile(tmp_path, model64, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import load_config
    from tunesmith.train.loop import run_training

    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    cfg = write_config(
        tmp_path / "c.yaml",
        model64,
        data,
        tmp_path / "run",
        train={"max_steps": 3},
        data={"system_prompt": "Answer briefly."},
    )
    run = run_training(load_config(cfg)).output_dir
    assert main(["export", str(run), "--format", "gguf", "--quant", "f32"]) == 0
    out = run / "export" / "model-f32.gguf"
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed and out.is_file()
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f32.gguf\n")
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}' in modelfile
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>" in modelfile
    assert 'SYSTEM """Answer briefly."""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

    tok = AutoTokenizer.from_pretrained(run)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model64), str(run)).eval()
    assert torch.allclose(logits_of(load_gguf(out), tok), logits_of(tuned, tok), atol=1e-4, rtol=0)

    before = out.read_bytes()
    capsys.readouterr()  # drop the loaders' progress bars
    assert main(["export", str(run), "--quant", "f32"]) == 2  # exists: refused, untouched
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and out.read_bytes() == before
    assert main(["export", str(run), "--quant", "f32", "--force"]) == 0
    assert main(["export", str(run), "--quant", "q8_0"]) == 0  # second export keeps the first Modelfile
    assert (out.parent / "Modelfile").read_text() == modelfile
    assert (out.parent / "model-q8_0.Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")


def one_line_error(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse rejects a bad flag value itself
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line(tmp_path, model64, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    assert "fake.gguf" in one_line_error(capsys, "export", str(fake))

    good = export_gguf(str(model64), tmp_path / "good.gguf", quant="f32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    assert "cut.gguf" in one_line_error(capsys, "export", str(cut))

    broken = tmp_path / "broken"
    shutil.copytree(model64, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors" in one_line_error(capsys, "export", str(broken))

    other = tmp_path / "gpt2-model"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    err = one_line_error(capsys, "export", str(other))
    assert "gpt2" in err and "llama, mistral, qwen2" in err
    assert "--quant" in one_line_error(capsys, "export", str(model64), "--quant", "q3_k")
    assert ".gguf" in one_line_error(capsys, "export", str(model64), "--out", str(tmp_path / "x.bin"))
    assert not list(tmp_path.glob("*-f16.gguf"))


def test_default_name_outside_a_run(tmp_path, model64, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = export_gguf(str(model64), quant="q4_0")
    assert out == Path(f"{model64.name}-q4_0.gguf") and out.is_file()
    with pytest.raises(UserError, match="already exists"):
        export_gguf(str(model64), quant="q4_0")
