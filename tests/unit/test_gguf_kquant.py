"""`tunesmith export --quant q4_k_m|q5_k_m|q6_k`: llama.cpp's own quantizer over the f32 GGUF tunesmith writes.

The tiny model here is 256 wide (K-quants pack 256 weights per block), so every matrix can take
a K type; its logits in llama.cpp are compared with the f32 file's on the same prompt. A file
whose bytes were not real K-quant blocks of these weights (wrong layout, wrong scale) would be
off by about the logits' own size, far above the bounds. llama_cpp is imported directly: CI
installs the `gguf` extra, and a missing binding must fail these tests rather than skip them.
"""

import importlib.util
import json

import llama_cpp
import numpy as np
import pytest
import torch

from tests.tiny import make_tokenizer
from tests.unit.test_gguf_export import fields, make_model_dir, one_line_error
from tunesmith.cli import main
from tunesmith.export.gguf import export_gguf

PROMPT = "<|im_start|>user\nWhat is the capital of Zorbia?<|im_end|>\n<|im_start|>assistant\nThe capital"
# relative RMS error of the logits vs the f32 file (measured: q6_k 0.049, q5_k_m 0.083, q4_k_m 0.153)
BOUNDS = {"q6_k": 0.08, "q5_k_m": 0.13, "q4_k_m": 0.25}
K_TYPES = {"q6_k": {"Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q4_k_m": {"Q4_K", "Q6_K"}}


def make_wide_model_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).float().eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def rel_error(got, want):
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    model = make_wide_model_dir(root / "model")
    ids = make_tokenizer()(PROMPT)["input_ids"]
    f32 = export_gguf(str(model), root / "out" / "f32.gguf", quant="f32")
    return model, root / "out", ids, llama_logits(f32, ids), f32.stat().st_size


def test_k_quants_are_llama_cpp_files_close_to_f32(wide):
    model, out, ids, ref, f32_size = wide
    errors, sizes = {}, {}
    for quant in BOUNDS:
        path = export_gguf(str(model), out / f"{quant}.gguf", quant=quant)
        meta, tensors = fields(path)
        assert meta["general.file_type"] == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
        assert meta["general.name"] == quant and meta["tokenizer.ggml.pre"] == "gpt-2"  # the f32 file's kv, kept
        matrices = {n: t.tensor_type.name for n, t in tensors.items() if len(t.shape) == 2}
        assert set(matrices.values()) <= K_TYPES[quant], matrices
        assert matrices["token_embd.weight"] == "Q6_K"  # the tied head: llama.cpp keeps it wider
        assert all(t.tensor_type.name == "F32" for t in tensors.values() if len(t.shape) == 1)
        errors[quant], sizes[quant] = rel_error(llama_logits(path, ids), ref), path.stat().st_size
        assert 1e-4 < errors[quant] < BOUNDS[quant], (quant, errors[quant])
        modelfile = (out / f"{quant}.Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./{quant}.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"]
    assert sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"] < f32_size / 4
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the temporary f32 file is gone


def test_rows_narrower_than_a_k_block_fall_back(tmp_path):
    """Hidden 64: no row is a whole 256-wide block, so llama.cpp picks a legacy type per tensor;
    the file still loads and stays close to f32."""
    model = make_model_dir(tmp_path / "m64")
    ids = make_tokenizer()(PROMPT)["input_ids"]
    ref = llama_logits(export_gguf(str(model), tmp_path / "f32.gguf", quant="f32"), ids)
    path = export_gguf(str(model), tmp_path / "q4_k_m.gguf", quant="q4_k_m")
    types = {t.tensor_type.name for t in fields(path)[1].values() if len(t.shape) == 2}
    assert types and types <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}, types  # measured: Q5_0, Q8_0
    assert rel_error(llama_logits(path, ids), ref) < 0.3


def test_cli_k_quant_verifies_with_its_threshold(tmp_path, wide, capsys):
    model = wide[0]
    out = tmp_path / "m.gguf"
    assert main(["export", str(model), "--quant", "q5_k_m", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "q5_k_m" in printed and "gguf q5_k_m" in printed
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["thresholds"] == {"max_ppl_ratio": 1.02} and report["passed"]
    assert abs(report["verification"]["ppl_ratio"] - 1) < 0.02


def test_bad_quant_and_missing_llama_cpp_are_one_line(tmp_path, wide, capsys, monkeypatch):
    model = wide[0]
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "export", str(model), "--quant", "q3_k")
    assert "q4_k_m" in err and "q6_k" in err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real_find_spec(n, *a))
    err = one_line_error(capsys, "export", str(model), "--quant", "q4_k_m", "--no-verify")
    assert "tunesmith[gguf]" in err and "q4_k_m" in err
    assert not list(tmp_path.iterdir())


def test_imatrix_columns_and_llama_cpp_uses_it(wide, tmp_path):
    """tunesmith's importance matrix has one positive value per input column of every matrix, under
    llama.cpp's tensor names; the quantizer really weights by it: columns given 10^4× importance
    come out of q4_k_m with less error than the same columns quantized without it."""
    from gguf.quants import dequantize

    from tunesmith.errors import UserError
    from tunesmith.export.imatrix import calibration_windows, collect_imatrix, model_window
    from tunesmith.export.kquant import quantize_gguf
    from tunesmith.export.merge import load_merged

    model_dir, out, _ids, _ref, _size = wide
    model, tok = load_merged(str(model_dir))
    windows = calibration_windows(tok, window=model_window(model), max_tokens=300)
    assert len(windows) == 2 and all(2 <= len(w) <= 256 for w in windows)  # the model's 256-token context
    with pytest.raises(UserError, match="missing.txt"):
        calibration_windows(tok, tmp_path / "missing.txt")
    imx = collect_imatrix(model, windows)
    _meta, tensors = fields(out / "f32.gguf")
    matrices = {n: t for n, t in tensors.items() if len(t.shape) == 2}
    assert set(imx) == set(matrices)  # the tied embedding is the output head llama.cpp multiplies by
    for name, values in imx.items():
        assert values.shape == (int(matrices[name].shape[0]),) and (values > 0).all(), name
    assert np.array_equal(imx["blk.0.attn_q.weight"], imx["blk.0.attn_v.weight"])  # the same input
    assert not np.array_equal(imx["blk.0.attn_q.weight"], imx["blk.0.ffn_up.weight"])

    skewed = {n: np.where(np.arange(v.size) % 8 == 0, 1e4, 1.0).astype(np.float32) for n, v in imx.items()}
    plain = quantize_gguf(out / "f32.gguf", tmp_path / "plain.gguf", "q4_k_m", 1)
    weighted = quantize_gguf(out / "f32.gguf", tmp_path / "weighted.gguf", "q4_k_m", 1, imatrix=skewed)
    name = "blk.0.ffn_up.weight"
    want = np.array(matrices[name].data, dtype=np.float64)
    errs = []
    for path in (plain, weighted):
        t = fields(path)[1][name]
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        errs.append(np.sqrt(((got - want)[:, ::8] ** 2).mean()))
    assert errs[1] < 0.8 * errs[0], errs
