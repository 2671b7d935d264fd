"""The support matrix of docs/export-and-serve.md, one family per parametrized case: a tiny random model
with the family's real config shape trains (the real loop, LoRA), merges (`tunesmith merge`: the merged
dir reloads with transformers and gives the PEFT model's logits), exports to an f32 GGUF, and
llama.cpp's logits at every position match PyTorch's. Plus which fast paths each family takes, and
the configs llama.cpp would run differently, refused in one line with nothing written.

Shapes (tiny widths, GQA 4 heads / 2 kv everywhere): Llama tied (SmolLM2); Mistral untied; Qwen2 tied
with q/k/v biases; Qwen3 tied, q/k norms, head_dim ≠ hidden/heads; Gemma 2 tied, (1 + w) norms before
and after attention and MLP, √hidden embedding scale, attention and final-logit soft-capping (small
caps, so they bite), alternating sliding-window layers with a window shorter than the prompt; Gemma 3
(text) the same with q/k norms, no attention cap, a local/global layer pattern, separate RoPE bases and
linear RoPE scaling on global layers (the 4B+ shape); Phi-3 untied, fused qkv_proj / gate_up_proj,
partial rotary (Phi-4-mini's 0.75).
"""

import numpy as np
import pytest
import torch

from tests.tiny import make_family_model, make_tokenizer, write_config, write_qa_jsonl
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.export.gguf import export_gguf
from tunesmith.train.kernels import FAMILIES, attach, family_of

GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
CASES = {
    "llama": dict(tie=True),
    "mistral": dict(tie=False, sliding_window=128),  # llama.cpp drops the window: exact up to it
    "qwen2": dict(tie=True),
    "qwen3": dict(tie=True, head_dim=16),
    "gemma2": dict(tie=True, attn_logit_softcapping=0.5, final_logit_softcapping=0.3, **GEMMA),
    "gemma3": dict(
        tie=True,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},  # not llama.cpp's default
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
        **GEMMA,
    ),
    "phi3": dict(
        tie=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    ),
}
ARCH = {"mistral": "llama", "llama": "llama"}
PROMPT = (
    "<|im_start|>user\nWhat is the capital of Zorbia? The quick brown fox jumps over the lazy dog."
    "<|im_end|>\n<|im_start|>assistant\nThe capital"
)


def make_dir(path, family, **extra):
    """The family's tiny model and the tiny byte-level BPE tokenizer, saved; 1-D weights (norms,
    biases) randomized so Gemma's (1 + w) and Qwen2's biases count."""
    tok = make_tokenizer()
    case = {**CASES[family], **extra}
    tie = case.pop("tie")
    model = make_family_model(family, len(tok), tie=tie, **case)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_logits(model, tok, text=PROMPT):
    with torch.no_grad():
        return model(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits[0].numpy()


def llama_cpp_logits(gguf, tok, text=PROMPT):
    """Every position's logits from llama.cpp, with an f32 KV cache (its default f16 cache alone
    moves logits by ~1e-3)."""
    import llama_cpp

    ids = tok(text)["input_ids"]
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=64, n_threads=2, logits_all=True, type_k=f32, type_v=f32, verbose=False
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


class GgmlGelu(torch.nn.Module):
    """ggml's CPU tanh-GELU: a table indexed by the f16 value of x, holding f16 results. Gemma's
    reference runs it, so the comparison is about the export, not about that table (which alone
    moves Gemma's logits by ~1e-3 of their size)."""

    def forward(self, x):
        return torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def like_ggml(model):
    for module in model.modules():
        if type(module).__name__.startswith("Gemma") and type(module).__name__.endswith("MLP"):
            module.act_fn = GgmlGelu()
    return model


def assert_logits_match(got, want):
    """Within 2e-4 of the largest logit (measured: ≤ 1e-6 for the SwiGLU families, ≤ 7e-5 for Gemma),
    and the same argmax at every position."""
    assert got.shape == want.shape
    diff = np.abs(got - want).max()
    assert diff <= 2e-4 * np.abs(want).max(), diff
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_trains_merges_exports_and_runs_in_llama_cpp(tmp_path, family):
    from gguf import GGUFReader
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import load_config
    from tunesmith.train.loop import run_training

    base = make_dir(tmp_path / "base", family)
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=8)
    cfg = write_config(tmp_path / "c.yaml", base, data, tmp_path / "run", train={"max_steps": 2, "lr": 5e-2})
    run = run_training(load_config(cfg)).output_dir

    tok = AutoTokenizer.from_pretrained(run)
    original = AutoModelForCausalLM.from_pretrained(base).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run)).eval()
    want = hf_logits(tuned, tok)
    assert np.abs(want - hf_logits(original, tok)).max() > 1e-3  # training moved it

    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is type(original)
    np.testing.assert_allclose(hf_logits(merged, tok), want, atol=1e-5, rtol=0)

    gguf = export_gguf(str(run), tmp_path / "m.gguf", quant="f32")
    reader = GGUFReader(str(gguf))
    assert reader.fields["general.architecture"].contents() == ARCH.get(family, family)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is (not CASES[family]["tie"])
    reference = hf_logits(like_ggml(tuned), tok)
    assert_logits_match(llama_cpp_logits(gguf, tok), reference)
    # f16, the default --quant: the same graph, weights rounded to half precision
    half = llama_cpp_logits(export_gguf(str(run), tmp_path / "h.gguf", quant="f16"), tok)
    assert np.abs(half - reference).max() <= 1e-2 * np.abs(reference).max()


def test_gemma_norm_shift_and_caps_are_what_llama_cpp_needs(tmp_path):
    """The exported norms are w + 1, and without the caps the logits would differ: the match above
    is not one the caps could pass by being no-ops."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model_dir = make_dir(tmp_path / "g", "gemma2")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gguf = export_gguf(str(model_dir), tmp_path / "g.gguf", quant="f32")
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    norm = model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(tensors["blk.0.post_ffw_norm.weight"].data), norm + 1, atol=1e-6)
    tok = make_tokenizer()
    capped = hf_logits(model, tok)
    model.config.final_logit_softcapping = None
    assert np.abs(hf_logits(model, tok) - capped).max() > 0.05


FAST = {"attention", "mlp", "norm", "groups"}


@pytest.mark.parametrize("family", sorted(CASES))
def test_which_fast_paths_each_family_takes(tiny_tokenizer, family):
    """The matrix's training column: a `kernels.FAMILIES` row takes every node; Gemma (tanh-GELU MLP,
    (1 + w) norms, soft-capped or windowed attention) and Phi-3 (fused qkv / gate_up) train on
    transformers' own modules; per-sample attention serves those whose attention allows it."""
    case = dict(CASES[family])
    model = make_family_model(family, len(tiny_tokenizer), tie=case.pop("tie"), **case)
    fast = attach(model, varlen=True, mlp=True, norm=True, rope=True, groups=True, max_length=64)
    kinds = {type(m).__name__ for m in fast.patched}
    taken = {"groups"} if fast.groups else set()
    for part in ("attention", "mlp", "norm"):
        if any(getattr(row, part) in kinds for row in FAMILIES.values()):
            taken.add(part)
    expected = FAST if family in FAMILIES else set()
    assert (family_of(model), taken) == (family if family in FAMILIES else None, expected)
    # Gemma 2 caps attention logits and both Gemmas' windows (8) are shorter than the samples (64).
    assert fast.flat is (family not in ("gemma2", "gemma3"))
    fast.restore()


LONGROPE = {"long_factor": [1.0, 2.0, 3.0, 4.0], "short_factor": [1.0] * 4}  # Phi-3-128k / Phi-3.5


@pytest.mark.parametrize(
    "family,extra,message",
    [
        ("gemma2", {"tie": False}, "only tied heads"),
        ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar 32"),
        ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "alternate"),
        ("gemma3", {"attn_logit_softcapping": 20.0}, "soft-capping"),
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, **LONGROPE}}, "'longrope'"),
    ],
)
def test_configs_llama_cpp_would_run_differently_are_refused(tmp_path, capsys, family, extra, message):
    model_dir = make_dir(tmp_path / family, family, **extra)
    out = tmp_path / "x.gguf"
    with pytest.raises(UserError, match=message):
        export_gguf(str(model_dir), out, quant="f32")
    capsys.readouterr()
    assert main(["export", str(model_dir), "--out", str(out), "--quant", "f32"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))
    assert not (tmp_path / "Modelfile").exists()


def test_multimodal_gemma3_is_refused_naming_the_text_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output would go
    other = tmp_path / "gemma3-vlm"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gemma3"}')
    assert main(["export", str(other), "--quant", "f32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Gemma3ForCausalLM" in err and "gemma3_text" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(other.iterdir())[1:]
