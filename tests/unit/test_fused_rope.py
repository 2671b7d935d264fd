"""RoPE inside the per-sample attention node (`train.fused_rope`): the node equals transformers'
RoPE followed by causal SDPA per sample (fp64, GQA, `gradcheck`); a whole model trains exactly as
with transformers' attention (fp32; bf16 within its rounding), q/k/v gradients reach a q/k/v group
without a copy, anything but the padding-free training case runs the module's own forward, and
`restore_rope` puts the modules back."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.unit.test_bf16_compute import _close_in_bf16
from tests.unit.test_fused_groups import _lora, spy_joined
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.data.packing import collate, unpacked
from tunesmith.train.kernels import attach
from tunesmith.train.kernels.attention import flatten
from tunesmith.train.kernels.patch import unpatch
from tunesmith.train.kernels.rope import RopeSegmentFlashFn

SEGMENTS = [(0, 5), (5, 7), (7, 12)]


def _inputs(dtype=torch.float64, heads=4, kv=2, dim=8, n=12):
    torch.manual_seed(0)
    t = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = t(1, n, heads, dim), t(1, n, kv, dim), t(1, n, kv, dim)
    pos = torch.cat([torch.arange(e - s) for s, e in SEGMENTS]).to(dtype)
    freqs = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=dtype) / dim))[None]
    emb = torch.cat([freqs, freqs], dim=-1)[None]
    return q, k, v, emb.cos(), emb.sin()


def _reference(q, k, v, cos, sin, scale):
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    vt = v.transpose(1, 2)
    parts = [
        F.scaled_dot_product_attention(
            qr[:, :, s:e], kr[:, :, s:e], vt[:, :, s:e], is_causal=True, scale=scale, enable_gqa=True
        )
        for s, e in SEGMENTS
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


def test_node_equals_rope_then_attention_per_sample():
    q, k, v, cos, sin = _inputs()
    scale = 0.3
    got = RopeSegmentFlashFn.apply(q, k, v, cos, sin, SEGMENTS, scale)
    want = _reference(q, k, v, cos, sin, scale)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))
    torch.autograd.gradcheck(lambda *x: RopeSegmentFlashFn.apply(*x, cos, sin, SEGMENTS, scale), (q, k, v))


def test_node_in_bf16_computes_in_fp32_and_rounds_once():
    q, k, v, cos, sin = _inputs(torch.float32)
    low = [x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    got = RopeSegmentFlashFn.apply(*low, cos.to(torch.bfloat16), sin.to(torch.bfloat16), SEGMENTS, 0.3)
    assert got.dtype == torch.bfloat16
    exact = [x.detach().float().requires_grad_() for x in low]
    want = _reference(*exact, cos, sin, 0.3)
    _close_in_bf16(got.float(), want, "output")
    g_out = torch.linspace(-1, 1, got.numel()).view(got.shape)
    grads = torch.autograd.grad(got, low, g_out.bfloat16())
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # the backward rotates q, k again from the kept bf16 inputs and reads the bf16-rounded output
    for name, g, w in zip("qkv", grads, torch.autograd.grad(want, exact, g_out)):
        _close_in_bf16(g.float(), w, f"grad {name}")


def _model(tok, method="lora", **kw):
    model = _lora(tok, method=method, **kw)
    attach(model, norm=True)
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_trains_as_with_transformers_attention(tiny_tokenizer, method, monkeypatch):
    model = _model(tiny_tokenizer, method)
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD), multiple=8, pad_id=PAD)]
    plain = loss_and_grads(model, batches)
    switched = attach(model, rope=True).patched
    assert len(switched) == model.config.num_hidden_layers
    calls = []
    original = RopeSegmentFlashFn.apply
    monkeypatch.setattr(RopeSegmentFlashFn, "apply", lambda *a: calls.append(1) or original(*a))
    assert_same(loss_and_grads(model, batches), plain)
    assert len(calls) == len(switched)
    for module in switched:
        unpatch(module)
    calls.clear()
    assert_same(loss_and_grads(model, batches), plain)
    assert not calls


def test_model_in_bf16_within_rounding(tiny_tokenizer):
    model = _model(tiny_tokenizer, "lora")
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(model, batches)
        attach(model, rope=True)
        fused = loss_and_grads(model, batches)
    assert fused[0] == pytest.approx(plain[0], rel=1e-2)
    for name in plain[1]:
        _close_in_bf16(fused[1][name], plain[1][name], name)


def test_qkv_gradients_reach_the_group_without_a_copy(tiny_tokenizer, monkeypatch):
    model = _model(tiny_tokenizer, "lora")
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    plain = loss_and_grads(model, batches)
    attach(model, groups=True)
    attach(model, rope=True)
    taken = spy_joined(monkeypatch)
    assert_same(loss_and_grads(model, batches), plain)
    qkv = [same for n, same in taken if n == 3]
    assert len(qkv) == model.config.num_hidden_layers and all(qkv)


def test_padded_batches_and_generation_take_the_modules_own_forward(tiny_tokenizer, monkeypatch):
    model = _model(tiny_tokenizer, "lora")
    attach(model, rope=True)
    calls = []
    original = RopeSegmentFlashFn.apply
    monkeypatch.setattr(RopeSegmentFlashFn, "apply", lambda *a: calls.append(1) or original(*a))
    loss_and_grads(model, [collate(unpacked(samples_for(tiny_tokenizer, False), PAD), PAD)])  # padded: a mask
    model.eval()
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert not calls
