"""Reused scratch buffers (`train/scratch.py`) and the nodes that use them: one buffer per tag,
grown on demand; switched off, fresh tensors; the loss over reused buffers stays exact from call to
call whatever the row count; the SwiGLU node writes ∂gate/∂up into a gate/up group's own output
and into nothing else; the RMSNorm node over reused buffers equals it over fresh tensors."""

import pytest
import torch
import torch.nn.functional as F

import tunesmith.train.loss as loss_mod
from tunesmith.train.kernels.groups import GroupLinearFn
from tunesmith.train.kernels.mlp import SwiGLUDownFn
from tunesmith.train.kernels.norm import RMSNormFn
from tunesmith.train.kernels.scratch import release, scratch, use_scratch
from tunesmith.train.loss import LinearCrossEntropy


def test_one_buffer_per_tag_grown_on_demand():
    release()
    a = scratch("t.a", (4, 8), torch.float32, "cpu")
    again = scratch("t.a", (2, 8), torch.float32, "cpu")
    assert again.data_ptr() == a.data_ptr() and again.shape == (2, 8)
    assert scratch("t.b", (4, 8), torch.float32, "cpu").data_ptr() != a.data_ptr()
    assert scratch("t.a", (4, 8), torch.bfloat16, "cpu").data_ptr() != a.data_ptr()  # per dtype
    grown = scratch("t.a", (16, 8), torch.float32, "cpu")
    assert grown.shape == (16, 8) and scratch("t.a", (3, 8), torch.float32, "cpu").data_ptr() == grown.data_ptr()
    previous = use_scratch(False)
    try:
        one, two = scratch("t.a", (4, 8), torch.float32, "cpu"), scratch("t.a", (4, 8), torch.float32, "cpu")
        assert one.data_ptr() != two.data_ptr()
    finally:
        use_scratch(previous)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loss_over_reused_buffers_is_exact_from_call_to_call(monkeypatch, dtype):
    monkeypatch.setattr(loss_mod, "CHUNK", 4)
    torch.manual_seed(0)
    weight = torch.randn(13, 6)
    for rows in (9, 5, 11):  # the buffers grow, shrink and grow between calls
        hidden = torch.randn(rows, 6, requires_grad=True)
        targets = torch.randint(0, 13, (rows,))
        loss = LinearCrossEntropy.apply(hidden, weight, targets, dtype)
        loss.backward()
        ref_h = hidden.detach().clone().requires_grad_()
        cast = (lambda t: t.to(dtype).float()) if dtype else (lambda t: t)
        ref = F.cross_entropy(cast(ref_h) @ cast(weight).T, targets, reduction="sum")
        ref.backward()
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(loss, ref, **tol)
        torch.testing.assert_close(hidden.grad, ref_h.grad, **tol)


def test_swiglu_writes_gradients_into_a_group_output_only():
    torch.manual_seed(0)
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w_gate, w_up, w_down = t(7, 4), t(6, 4), t(6, 4), t(5, 6)
    scale = torch.linspace(-1, 1, 35, dtype=torch.float64).view(7, 5)

    def grads(gate, up):
        y = SwiGLUDownFn.apply(gate, up, w_down, None, None, None, 0.0)
        return torch.autograd.grad((y * scale).sum(), (x, w_gate, w_up, w_down))

    want = grads(x @ w_gate.T, x @ w_up.T)
    buffer = torch.cat([x @ w_gate.T, x @ w_up.T], dim=1)  # side by side, but not a group's output
    gate, up = buffer.split(6, dim=1)
    before = buffer.detach().clone()
    torch.testing.assert_close(grads(gate, up), want)
    assert torch.equal(buffer.detach(), before)  # left alone

    seen = []
    original = GroupLinearFn.backward
    GroupLinearFn.backward = staticmethod(lambda ctx, *g: seen.append([t.data_ptr() for t in g]) or original(ctx, *g))
    try:
        gate, up = GroupLinearFn.apply(x, None, torch.float64, w_gate, w_up)  # the group marks its output
        torch.testing.assert_close(grads(gate, up), want)
    finally:
        GroupLinearFn.backward = original
    ptr = gate.data_ptr()
    assert seen == [[ptr, ptr + 6 * 8]]  # ∂gate and ∂up written over gate and up: no new tensor


def test_loss_keeps_its_buffers_only_while_the_head_is_frozen():
    import tunesmith.train.kernels.scratch as scratch_mod

    torch.manual_seed(0)
    hidden = torch.randn(9, 6, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    kept = lambda: {k[0] for k in scratch_mod._BUFFERS if k[0].startswith("loss.")}  # noqa: E731
    LinearCrossEntropy.apply(hidden, torch.randn(13, 6), targets, torch.bfloat16).backward()
    assert kept() == {"loss.logits", "loss.fp32"}  # LoRA: reused from step to step
    LinearCrossEntropy.apply(hidden, torch.randn(13, 6, requires_grad=True), targets, torch.bfloat16).backward()
    assert not kept()  # full fine-tuning: its peak is weights, gradients and optimizer state


@pytest.mark.parametrize(
    "in_dtype, out_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
)
def test_norm_over_reused_buffers_equals_fresh_tensors_and_returns_none_of_them(in_dtype, out_dtype):
    torch.manual_seed(0)
    weight = torch.randn(24, requires_grad=True)

    def run(rows):
        torch.manual_seed(rows)
        x = torch.randn(1, rows, 24).to(in_dtype).requires_grad_()
        out = RMSNormFn.apply(x, weight, 1e-5, out_dtype)
        grads = torch.autograd.grad(out, (x, weight), torch.randn(out.shape).to(out.dtype))
        return [out.detach(), *grads]

    previous = use_scratch(False)
    try:
        fresh = [run(rows) for rows in (9, 5, 11)]
    finally:
        use_scratch(previous)
    reused = [run(rows) for rows in (9, 5, 11)]  # the buffers grow, shrink and grow between calls
    for want, got in zip(fresh, reused):  # earlier results are intact after later calls: nothing aliases a buffer
        for a, b in zip(want, got):
            assert torch.equal(a, b)
