"""Fused RMSNorm (`train.fused_norm`): the one-node RMSNorm gives transformers' output exactly in
fp32, its gradients match autograd's (and `gradcheck` in fp64), it hands bf16 to the projections
under bf16 autocast, and a whole model trains the same with it."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.tiny import make_tiny_model
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.data.packing import unpacked
from tunesmith.train.kernels import attach
from tunesmith.train.kernels.attention import flatten
from tunesmith.train.kernels.norm import RMSNormFn
from tunesmith.train.kernels.patch import unpatch


def _norm(dtype=torch.float32):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(24, dtype=dtype)
    return norm


def test_fp32_output_is_transformers_and_gradients_match_autograd():
    norm = _norm()
    x = torch.randn(2, 9, 24, requires_grad=True)
    want = norm(x)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, norm.weight), g)
    switched = attach(norm, norm=True).patched
    got = norm(x)
    got_grads = torch.autograd.grad(got, (x, norm.weight), g)
    for module in switched:
        unpatch(module)
    assert switched == [norm] and "forward" not in vars(norm)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_in_fp64():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-6, None), (x, w))


@pytest.mark.parametrize("stream", [torch.float32, torch.bfloat16])
def test_bf16_autocast_output_is_bf16_rounded_once(stream):
    norm = _norm()
    x = torch.randn(2, 9, 24).to(stream)
    want = norm(x.float())  # exact fp32 normalisation
    attach(norm, norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norm(x.requires_grad_())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0, rtol=2**-8)  # one bf16 rounding
    got.float().sum().backward()
    assert x.grad.dtype == stream


@pytest.mark.parametrize("lora", [False, True])
def test_model_trains_the_same_with_fused_norms(tiny_tokenizer, lora):
    model = make_tiny_model(len(tiny_tokenizer))
    if lora:
        from tunesmith.adapters.methods import apply_method
        from tunesmith.config import AdapterConfig

        model = apply_method(model, AdapterConfig(method="lora", rank=4, alpha=8))
    attach(model, varlen=True)
    attach(model, mlp=True)
    model.train()
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    plain = loss_and_grads(model, batches)
    switched = attach(model, norm=True).patched
    assert len(switched) == 2 * model.config.num_hidden_layers + 1
    fused = loss_and_grads(model, batches)
    assert_same(fused, plain)
