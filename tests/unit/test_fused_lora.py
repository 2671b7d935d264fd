"""The fused LoRA layer (`tunesmith.adapters.fused_lora`) trains exactly like PEFT's own LoRA layer: same
loss and gradients within fp32 noise, on a real (tiny) Llama and on a bare layer with a bias, and
it falls back to PEFT's forward where it does not apply."""

import pytest
import torch
from peft import PeftModel

from tests.tiny import make_tiny_model
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.adapters.dropout import Mask
from tunesmith.adapters.fused_lora import FusedLoraLinear, LoraLinearFn
from tunesmith.adapters.methods import apply_method
from tunesmith.config import AdapterConfig
from tunesmith.data.packing import collate, unpacked


def _random_lora(model):
    # B starts at zero in real training; random B makes every gradient path non-trivial
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_matches_peft(tiny_tokenizer, checkpointing):
    batches = [collate(unpacked(samples_for(tiny_tokenizer, False), PAD), PAD)]
    results = []
    for fused in (True, False):
        model = make_tiny_model(len(tiny_tokenizer))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_method(model, AdapterConfig(method="lora", rank=4, alpha=8, fused=fused))
        layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
        assert bool(layers) == fused and len(layers) in (0, 14)  # 7 projections × 2 layers
        _random_lora(model)
        model.train()
        results.append(loss_and_grads(model, batches))
    assert_same(results[0], results[1])


@pytest.mark.parametrize("mask", [None, Mask(seed=123, p=0.3)])  # no dropout; LoRA dropout's mask
def test_fused_function_gradients_with_bias_and_3d_input(mask):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *t: LoraLinearFn.apply(*t, 0.7, mask), (x, w, bias, a, b))
    y = LoraLinearFn.apply(x, w, bias, a, b, 0.7, mask)
    dropped = x if mask is None else x * mask.noise(x)
    torch.testing.assert_close(y, x @ w.T + bias + 0.7 * (dropped @ a.T) @ b.T)


def test_falls_back_to_peft_where_it_does_not_apply(tiny_tokenizer, tmp_path):
    model = apply_method(make_tiny_model(len(tiny_tokenizer)), AdapterConfig(method="lora", rank=4))
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(3, layer.in_features)
    assert layer._fused_adapter(x, (), {}) == "default"
    with model.disable_adapter():
        assert layer._fused_adapter(x, (), {}) is None
    assert layer._fused_adapter(x.double(), (), {}) is None

    # what it saves is a plain PEFT adapter
    _random_lora(model)
    model.save_pretrained(tmp_path)
    assert "_custom_modules" not in (tmp_path / "adapter_config.json").read_text()
    plain = PeftModel.from_pretrained(make_tiny_model(len(tiny_tokenizer)), tmp_path)
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)


# ---------------------------------------------------------------- full fine-tuning's embedding gradient


@pytest.mark.parametrize("tie", [True, False])
def test_embedding_gradient_into_grad_matches_autograd(tiny_tokenizer, tie):
    """`EmbedIntoGrad` (full fine-tuning) gives the embedding (tied to the head or not) the same
    gradient as autograd's dense embedding backward, accumulated over two micro-batches."""
    from tunesmith.train.loss import LossModule, can_embed_into_grad

    samples = samples_for(tiny_tokenizer, False)
    batches = [collate(unpacked(samples[:2], PAD), PAD), collate(unpacked(samples[2:], PAD), PAD)]
    grads = []
    for into_grad in (True, False):
        model = make_tiny_model(len(tiny_tokenizer), tie=tie).train()
        assert can_embed_into_grad(model)
        module = LossModule(model, embed_into_grad=into_grad)
        for batch in batches:
            loss_sum, _ = module(**batch)
            loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[1]:
        torch.testing.assert_close(
            grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert grads[0]["model.embed_tokens.weight"].abs().sum() > 0
