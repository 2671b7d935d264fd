"""`tunesmith quantize`: int8/int4 weight-only tensors in safetensors, rebuilt on PyTorch's CPU kernels."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.unit.test_gguf_export import logits_of, make_model_dir
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.export.quantize import (
    Int4Linear,
    Int8Linear,
    int4_codes,
    int8_codes,
    load_quantized,
    quantize_with_report,
    save_quantized,
    unpack_int4,
)


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("q64"))


@pytest.mark.parametrize("rows,kernel", [(16, True), (8, False)])  # the CPU kernel needs rows % 16 == 0
def test_int4_packing_roundtrip(rows, kernel):
    torch.manual_seed(0)
    w = torch.randn(rows, 64)
    packed, scales = int4_codes(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 32) and scales.shape == (rows, 2)
    codes = unpack_int4(packed)
    assert codes.min() >= 0 and codes.max() <= 15
    deq = ((codes - 8).float().reshape(rows, 2, 32) * scales[..., None]).reshape(rows, 64)
    assert (deq - w).abs().max() <= scales.abs().max() + 1e-6  # within one step (+8 clamps to 7)
    bias = torch.randn(rows)
    layer = Int4Linear(packed, scales, 32, bias)
    assert layer.kernel is kernel
    x = torch.randn(3, 5, 64)
    want = x @ deq.t() + bias
    assert torch.allclose(layer(x), want, atol=0.02 * want.abs().max().item())  # bf16 activations


@pytest.mark.parametrize("method,bound", [("int8", 0.99), ("int4", 0.95)])
def test_quantize_save_load(tmp_path, model64, method, bound):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = save_quantized(str(model64), tmp_path / method, method=method)
    assert (out / "quantized.safetensors").stat().st_size < (model64 / "model.safetensors").stat().st_size
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle anywhere
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["method"] == method and "model.layers.0.mlp.down_proj" in manifest["modules"]
    assert len(manifest["modules"]) == 2 * 7  # every Linear of both layers; the tied head stays fp32
    with safe_open(str(out / "quantized.safetensors"), framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        assert q.dtype == (torch.int8 if method == "int8" else torch.uint8)
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()

    model, tok = load_quantized(out)
    tok_ref = AutoTokenizer.from_pretrained(model64)
    want = logits_of(AutoModelForCausalLM.from_pretrained(model64).eval(), tok_ref)
    got = logits_of(model, tok)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > bound
    assert type(model.model.layers[0].mlp.up_proj).__name__ == ("Int8Linear" if method == "int8" else "Int4Linear")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_report_and_cli(tmp_path, model64, capsys):
    assert main(["quantize", str(model64), "--method", "int4", "--out", str(tmp_path / "q4")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "q4" / "report.json").read_text())
    assert "| PyTorch int4" in printed and "| fp32 PyTorch" in printed and "ppl/fp32" in printed
    ref, row = report["table"]
    assert row["size_mib"] > 0 and row["tok_s"] > 0 and 0.8 < row["ppl_ratio"] < 1.2 and ref["ppl_ratio"] == 1.0
    assert report["manifest"]["method"] == "int4" and report["manifest"]["group_size"] == 32

    capsys.readouterr()
    assert main(["quantize", str(model64), "--method", "int4", "--out", str(tmp_path / "q4")]) == 2  # not empty
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    with pytest.raises(UserError, match="eval_text"):
        quantize_with_report(str(model64), tmp_path / "q8", "int8", eval_text=tmp_path / "empty.txt")


def test_bad_quantized_dir_is_one_line(tmp_path, model64):
    out = save_quantized(str(model64), tmp_path / "q8", method="int8")
    (out / "quantization.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="quantization.json"):
        load_quantized(out)


def test_int8_linear_matches_and_tolerates_unaligned_weights():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q, s = int8_codes(w)
    # safetensors hands out tensors at arbitrary byte offsets; this one starts 40 bytes in.
    raw = torch.zeros(q.numel() + 40, dtype=torch.int8)
    unaligned = raw[40:].view(48, 64)
    unaligned.copy_(q)
    layer = Int8Linear(unaligned, s, None)
    x = torch.randn(2, 7, 64)
    want = x @ (q.float() * s[:, None]).t()
    assert torch.allclose(layer(x), want, atol=0.02 * want.abs().max().item())
