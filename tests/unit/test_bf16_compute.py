"""bf16 compute (`train.precision=bf16`, what `auto` picks on CPUs with AMX): the fused LoRA, SwiGLU
and loss nodes run in bf16 themselves and train like the plain fp32 path within bf16 rounding;
`auto` settles by the hardware (or `TUNESMITH_BF16_UNITS`). These run on any CPU: bf16 without
AMX is slower, not different."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import make_tiny_model, write_config, write_qa_jsonl
from tests.unit.test_packing import PAD, loss_and_grads, samples_for
from tunesmith.adapters.fused_lora import LoraLinearFn
from tunesmith.adapters.methods import apply_method
from tunesmith.adapters.storage import BF16Storage, FrozenLinear
from tunesmith.config import AdapterConfig, TrainConfig, load_config
from tunesmith.data.packing import unpacked
from tunesmith.precision import resolve_precision
from tunesmith.train.kernels import attach
from tunesmith.train.kernels.attention import flatten, varlen_attention
from tunesmith.train.kernels.mlp import SwiGLUDownFn
from tunesmith.train.loss import LinearCrossEntropy


def _close_in_bf16(got, want, what):
    """Same direction and size within bf16 rounding of a few chained matmuls."""
    got, want = got.double().flatten(), want.double().flatten()
    cos = F.cosine_similarity(got, want, dim=0).item()
    ratio = (got.norm() / want.norm()).item()
    assert cos > 0.995 and abs(ratio - 1) < 0.03, f"{what}: cosine {cos:.5f}, norm ratio {ratio:.4f}"


def _model(tok, method, frozen, fused):
    model = make_tiny_model(len(tok))
    if method != "full":
        torch.manual_seed(0)
        model = apply_method(model, AdapterConfig(method=method, rank=4, alpha=8, fused=fused), frozen)
        torch.manual_seed(1)  # random B: every gradient path non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    attach(model, varlen=True)
    if fused:
        attach(model, mlp=True)
        attach(model, norm=True)
    model.train()
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_compute_trains_like_fp32(tiny_tokenizer, method, monkeypatch):
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    reference = loss_and_grads(_model(tiny_tokenizer, method, "fp32", fused=False), batches)
    calls = {"lora": 0, "mlp": 0}
    lora_apply, mlp_apply = LoraLinearFn.apply, SwiGLUDownFn.apply

    def counted(kind, original):
        def apply(*args):
            calls[kind] += 1
            assert all(a.dtype == torch.bfloat16 for a in args[:2])  # the node computes in bf16
            return original(*args)

        return apply

    monkeypatch.setattr(LoraLinearFn, "apply", counted("lora", lora_apply))
    monkeypatch.setattr(SwiGLUDownFn, "apply", counted("mlp", mlp_apply))
    model = _model(tiny_tokenizer, method, "bf16", fused=True)
    if method == "lora":  # frozen base stored in bf16, used as stored
        assert any(isinstance(m, FrozenLinear) and isinstance(m.storage, BF16Storage) for m in model.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batches)
    assert calls["mlp"] == 2 and calls["lora"] == (12 if method == "lora" else 0)  # 6 non-down × 2 layers
    assert loss == pytest.approx(reference[0], rel=1e-2)
    assert grads.keys() == reference[1].keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # gradients land on the fp32 weights
        _close_in_bf16(grad, reference[1][name], name)


@pytest.mark.parametrize("stored", [False, True])
def test_linear_cross_entropy_in_bf16(stored):
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (7,))
    want = F.cross_entropy(hidden @ head.weight.T, targets, reduction="sum")
    want_h, want_w = torch.autograd.grad(want, (hidden, head.weight))
    weight = FrozenLinear(BF16Storage(head.weight), None).storage.data if stored else head.weight
    got = LinearCrossEntropy.apply(hidden, weight, targets, torch.bfloat16)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-2)
    grads = torch.autograd.grad(got, (hidden, weight) if not stored else (hidden,))
    assert grads[0].dtype == torch.float32
    _close_in_bf16(grads[0], want_h, "hidden")
    if not stored:
        assert grads[1].dtype == torch.float32
        _close_in_bf16(grads[1], want_w, "weight")


def test_linear_cross_entropy_pads_bf16_rows_without_changing_anything(monkeypatch):
    """On a CPU, bf16 head chunks are padded to 32 rows (7 → 32, 300 → 256 + 64): the loss and both
    gradients are those of the unpadded rows."""
    import tunesmith.train.loss as loss_mod

    torch.manual_seed(0)
    for rows in (7, 300):
        hidden = torch.randn(rows, 16, requires_grad=True)
        weight = torch.randn(50, 16, requires_grad=True)
        targets = torch.randint(0, 50, (rows,))
        padded = LinearCrossEntropy.apply(hidden, weight, targets, torch.bfloat16)
        got = (padded, *torch.autograd.grad(padded, (hidden, weight)))
        monkeypatch.setattr(loss_mod, "gemm_rows_multiple", lambda dtype, device: 1)
        plain = LinearCrossEntropy.apply(hidden, weight, targets, torch.bfloat16)
        want = (plain, *torch.autograd.grad(plain, (hidden, weight)))
        monkeypatch.undo()
        assert got[1].shape == hidden.shape
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)


def test_varlen_attention_takes_bf16_and_gives_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 11, 8) for h in (4, 2, 2))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    module = type("Attn", (), {})()
    want, _ = varlen_attention(module, q, k, v, None, position_ids=position_ids)
    got, _ = varlen_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, position_ids=position_ids)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "1")
    assert resolve_precision(TrainConfig(), "lora", cpu) == ("bf16", "bf16")
    assert resolve_precision(TrainConfig(), "full", cpu) == ("bf16", "fp32")
    assert resolve_precision(TrainConfig(frozen_dtype="fp32"), "qlora", cpu) == ("bf16", "fp32")
    assert resolve_precision(TrainConfig(precision="fp32"), "lora", cpu) == ("fp32", "fp32")
    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "0")
    assert resolve_precision(TrainConfig(), "lora", cpu) == ("fp32", "fp32")
    assert resolve_precision(TrainConfig(precision="bf16"), "dora", cpu) == ("bf16", "bf16")
    assert resolve_precision(TrainConfig(frozen_dtype="bf16"), "lora", cpu) == ("fp32", "bf16")


def test_generation_weights_follow_the_same_rule(monkeypatch):
    from tunesmith.precision import inference_dtype

    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "1")
    assert inference_dtype("auto", "cpu") == torch.bfloat16 and inference_dtype("fp32", "cpu") == torch.float32
    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "0")
    assert inference_dtype("auto", "cpu") == torch.float32 and inference_dtype("bf16", "cpu") == torch.bfloat16


def test_auto_run_on_bf16_hardware_trains_in_bf16(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.train.loop import run_training

    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    losses = {}
    for units in ("0", "1"):
        monkeypatch.setenv("TUNESMITH_BF16_UNITS", units)
        cfg = write_config(
            tmp_path / f"c{units}.yaml",
            tiny_model_dir,
            data,
            tmp_path / f"out{units}",
            adapter={"method": "lora"},
            train={"max_steps": 6, "lr": 1e-3},
        )
        result = run_training(load_config(cfg))
        summary = json.loads((result.output_dir / "run.json").read_text())
        assert (summary["precision"], summary["frozen_dtype"]) == (
            ("bf16", "bf16") if units == "1" else ("fp32", "fp32")
        )
        losses[units] = summary["final_train_loss"]
    assert losses["1"] == pytest.approx(losses["0"], rel=2e-2)  # the "no worse within 2%"


def test_fit_does_not_suggest_fp32_where_auto_chose_bf16(monkeypatch):
    """With the bf16 fast paths a bf16 run peaks no higher than fp32: split forwards come first."""
    from tunesmith.config import Config
    from tunesmith.train.fit_report import _candidates

    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "1")
    cfg = Config()
    cfg.train.forward_tokens = "0"  # one forward per micro-batch: splitting it is the first remedy
    candidates = list(_candidates(cfg))
    assert candidates[0] == [f"train.forward_tokens={cfg.data.max_length}"]
    assert list(_candidates(Config()))[0] != candidates[0]  # auto with packing already splits so
    assert not any("train.precision=fp32" in c for c in candidates)
