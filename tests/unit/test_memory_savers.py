"""The activation-memory savers of the training step train exactly like the plain path: the fused
SwiGLU + down projection (`train/fused_mlp.py`), the head + loss with gradients computed in the
forward (`train/loss.py: LinearCrossEntropy`), and micro-batches split into smaller forwards
(`train.forward_tokens`). Same loss and gradients within fp32 noise, and less saved for backward."""

import pytest
import torch
import torch.nn.functional as F

import tunesmith.train.loss as loss_mod
from tests.tiny import make_tiny_model
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.adapters.methods import apply_method
from tunesmith.config import AdapterConfig
from tunesmith.data.packing import unpacked
from tunesmith.train.kernels import attach
from tunesmith.train.kernels.attention import flatten
from tunesmith.train.kernels.mlp import SwiGLUDownFn
from tunesmith.train.kernels.patch import unpatch
from tunesmith.train.loop import split_rows
from tunesmith.train.loss import LinearCrossEntropy


def _model(tok, method, checkpointing=False, **kw):
    model = make_tiny_model(len(tok))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model = apply_method(model, AdapterConfig(method=method, rank=4, alpha=8, **kw))
        torch.manual_seed(1)  # random B: every gradient path non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("lora", True), ("full", False), ("dora", False)])
def test_fused_mlp_trains_like_the_module(tiny_tokenizer, method, checkpointing):
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    results, calls = [], []
    original = SwiGLUDownFn.apply
    for fused in (True, False):
        model = _model(tiny_tokenizer, method, checkpointing)
        attach(model, varlen=True)
        switched = attach(model, mlp=True).patched if fused else []
        assert len(switched) == (2 if fused else 0)
        SwiGLUDownFn.apply = lambda *a: calls.append(1) or original(*a)
        try:
            results.append(loss_and_grads(model, batches))
        finally:
            SwiGLUDownFn.apply = original
        for module in switched:
            unpatch(module)
        assert all("forward" not in vars(m) for m in switched)
    assert_same(results[0], results[1])
    assert calls  # DoRA too: its down projection joins the node at dropout 0 (adapters.fused_dora)


def test_fused_mlp_function_gradients():
    torch.manual_seed(0)
    t = lambda *s, grad=True: torch.randn(*s, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    gate, up = t(2, 5, 6), t(2, 5, 6)
    w, bias, a, b = t(4, 6), t(4), t(3, 6), t(4, 3)
    torch.autograd.gradcheck(lambda *x: SwiGLUDownFn.apply(*x, 0.7), (gate, up, w.detach(), bias, a, b))
    torch.autograd.gradcheck(lambda *x: SwiGLUDownFn.apply(*x, None, None, 0.0), (gate, up, w, bias))
    y = SwiGLUDownFn.apply(gate, up, w, bias, a, b, 0.7)
    h = F.silu(gate) * up
    torch.testing.assert_close(y, h @ w.T + bias + 0.7 * (h @ a.T) @ b.T)


def _saved_bytes(model, batch):
    sizes = {}

    def pack(x):
        sizes[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss_mod.token_loss(model, **batch)
    return sum(v for k, v in sizes.items() if k not in params)


def test_fused_mlp_saves_two_intermediates_fewer(tiny_tokenizer):
    batch = flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))
    model = _model(tiny_tokenizer, "lora")
    attach(model, varlen=True)
    plain = _saved_bytes(model, batch)
    attach(model, mlp=True)
    fused = _saved_bytes(model, batch)
    tokens, inter, layers = batch["input_ids"].numel(), model.config.intermediate_size, model.config.num_hidden_layers
    assert plain - fused >= 2 * tokens * inter * 4 * layers  # silu(gate) and silu(gate)·up, fp32


def assert_gradients_of_ref(ref, hidden, weight, want_w):
    """`hidden.grad` (and `weight.grad`) hold the gradients of 2.5 × the loss under test: they must be
    those of 2.5 × `ref`. Logits are fp32 (as training computes them), so fp32 tolerances even on fp64
    inputs."""
    got = (hidden.grad.clone(), weight.grad.clone() if want_w else None)
    hidden.grad = weight.grad = None
    (ref * 2.5).backward()
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if want_w:
        torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("want_w", [True, False])
def test_linear_cross_entropy_gradients_over_chunks(monkeypatch, want_w):
    monkeypatch.setattr(loss_mod, "CHUNK", 3)  # 7 rows → chunks of 3, 3, 1
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=want_w)
    targets = torch.randint(0, 11, (7,))
    loss = LinearCrossEntropy.apply(hidden, weight, targets)
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(loss, ref.float())
    (loss * 2.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    assert_gradients_of_ref(ref, hidden, weight, want_w)
    with torch.no_grad():
        torch.testing.assert_close(LinearCrossEntropy.apply(hidden, weight, targets), ref.float())


def test_split_rows_by_token_budget(tiny_tokenizer):
    rows = unpacked(samples_for(tiny_tokenizer, False), PAD)
    sizes = [r.n_real for r in rows]
    budget = max(sizes) + 1
    groups = split_rows(rows, budget)
    assert [r for g in groups for r in g] == rows and len(groups) > 1
    assert all(len(g) == 1 or sum(r.n_real for r in g) <= budget for g in groups)
    assert split_rows(rows, 0) == [rows]
    assert [len(g) for g in split_rows(rows, 1)] == [1] * len(rows)  # a row over budget goes alone


def test_split_forwards_train_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    import tunesmith.train.loop as loop
    from tests.unit.test_loop import train_once

    whole = train_once(tmp_path, tiny_model_dir, "whole", max_steps=2, batch_size=4)
    groups = []
    plain_split = loop.split_rows
    monkeypatch.setattr(loop, "split_rows", lambda rows, budget: groups.append(plain_split(rows, budget)) or groups[-1])
    split = train_once(tmp_path, tiny_model_dir, "split", max_steps=2, batch_size=4, forward_tokens=40)
    assert len(groups) == 2 and all(len(g) >= 2 for g in groups)  # each step ran as 2+ forwards
    # gradients agree to fp32 noise (test_loop: accumulation equals one batch); Adam divides by
    # √v, so after two lr-1e-2 steps a near-zero gradient's noise shows up to ~1e-5 in the weights
    for name, tensor in whole.items():
        torch.testing.assert_close(split[name], tensor, atol=1e-4, rtol=1e-4)
