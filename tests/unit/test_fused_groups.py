"""Grouped LoRA projections (`train.fused_groups`): q/k/v and gate/up over a frozen base run as one
node per group, train exactly like the layers one by one (fp32; bf16 within its rounding), hold no
extra copy of the weights, and are separate layers again after `restore_groups`."""

import pytest
import torch

from tests.tiny import make_tiny_model
from tests.unit.test_bf16_compute import _close_in_bf16
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.adapters.methods import apply_method
from tunesmith.config import AdapterConfig
from tunesmith.data.packing import unpacked
from tunesmith.train.kernels import attach
from tunesmith.train.kernels.attention import flatten
from tunesmith.train.kernels.groups import GroupLoraFn, ungroup


def _lora(tok, frozen="fp32", method="lora", checkpointing=False, **adapter):
    torch.manual_seed(0)
    model = make_tiny_model(len(tok))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, AdapterConfig(method=method, rank=4, alpha=8, **adapter), frozen)
    torch.manual_seed(1)  # random B: every gradient path non-trivial
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    attach(model, varlen=True)
    attach(model, mlp=True)
    return model.train()


def _counting(monkeypatch):
    calls = []
    original = GroupLoraFn.apply
    monkeypatch.setattr(GroupLoraFn, "apply", lambda *a: calls.append(a[5]) or original(*a))  # sizes
    return calls


def test_groups_train_like_layers_one_by_one(tiny_tokenizer, monkeypatch):
    model = _lora(tiny_tokenizer)
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    plain = loss_and_grads(model, batches)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = q.detach().clone()
    groups = attach(model, groups=True).groups
    assert len(groups) == 2 * model.config.num_hidden_layers  # attention and MLP of each layer
    assert q.untyped_storage().data_ptr() == groups[0].weight.untyped_storage().data_ptr()  # a view, no copy
    calls = _counting(monkeypatch)
    grouped = loss_and_grads(model, batches)
    assert len(calls) == len(groups) and {len(sizes) for sizes in calls} == {2, 3}
    assert_same(grouped, plain)
    ungroup(groups)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, before) and q.untyped_storage().nbytes() == q.numel() * q.element_size()
    calls.clear()
    assert_same(loss_and_grads(model, batches), plain)
    assert not calls


def test_bf16_groups_over_a_bf16_base(tiny_tokenizer):
    model = _lora(tiny_tokenizer, frozen="bf16")
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(model, batches)
        assert attach(model, groups=True).groups
        grouped = loss_and_grads(model, batches)
    assert grouped[0] == pytest.approx(plain[0], rel=1e-2)
    for name, grad in grouped[1].items():
        assert grad.dtype == torch.float32
        _close_in_bf16(grad, plain[1][name], name)


def test_a_sibling_called_on_another_input_runs_alone(tiny_tokenizer, monkeypatch):
    model = _lora(tiny_tokenizer)
    attn = model.get_base_model().model.layers[0].self_attn
    attach(model, groups=True)
    calls = _counting(monkeypatch)
    x, other = torch.randn(1, 5, attn.q_proj.in_features), torch.randn(1, 5, attn.q_proj.in_features)
    q, k = attn.q_proj(x), attn.k_proj(other)
    assert len(calls) == 1
    torch.testing.assert_close(k, type(attn.k_proj).forward(attn.k_proj, other))
    torch.testing.assert_close(q, type(attn.q_proj).forward(attn.q_proj, x))


@pytest.mark.parametrize("method,adapter", [("dora", {"fused": False}), ("lora", {"fused": False})])
def test_layers_the_fused_path_cannot_take_are_not_grouped(tiny_tokenizer, method, adapter, monkeypatch):
    model = _lora(tiny_tokenizer, method=method, **adapter)
    groups = attach(model, groups=True).groups
    calls = _counting(monkeypatch)
    loss_and_grads(model, [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))])
    assert not calls
    ungroup(groups)


def _saved_bytes(model, fn):
    """Bytes autograd keeps for backward during `fn()`, weights excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_full_finetuning_groups_in_bf16_without_keeping_cast_weights(tiny_tokenizer, monkeypatch):
    from tunesmith.train.kernels.groups import GroupLinearFn

    model = make_tiny_model(len(tiny_tokenizer))
    attach(model, varlen=True)
    attach(model, mlp=True)
    attach(model, norm=True)
    model.train()
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    fp32 = loss_and_grads(model, batches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_bytes = _saved_bytes(model, lambda: loss_and_grads(model, batches))
        groups = attach(model, groups=True).groups
        calls = []
        original = GroupLinearFn.apply
        monkeypatch.setattr(GroupLinearFn, "apply", lambda *a: calls.append(len(a) - 3) or original(*a))
        grouped, grouped_bytes = _saved_bytes(model, lambda: loss_and_grads(model, batches))
    assert len(groups) == 4 and sorted(calls) == [2, 2, 3, 3]
    # autocast keeps a bf16 copy of each weight from forward to backward; the grouped node keeps none
    cast_copies = sum(layer.weight.numel() * 2 for group in groups for layer in group.layers)
    assert plain_bytes - grouped_bytes == cast_copies
    assert grouped[0] == pytest.approx(plain[0], rel=1e-3)
    for name, grad in grouped[1].items():
        assert grad.dtype == torch.float32
        _close_in_bf16(grad, plain[1][name], name)
    calls.clear()
    assert_same(loss_and_grads(model, batches), fp32)  # fp32: the layers one by one
    assert not calls


def test_grouping_a_file_mapped_base_lets_go_of_the_file(tiny_model_dir):
    """transformers maps an fp32 safetensors file and hands out views of it: the weights stacked
    into groups must not leave the file's pages resident beside the stack."""
    import gc
    import sys
    from pathlib import Path

    from tunesmith.models import load_model

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    path = str(next(Path(tiny_model_dir).glob("*.safetensors")).resolve())

    def mapped():
        with open("/proc/self/maps") as fh:
            return any(path in line for line in fh)

    model = apply_method(load_model(str(tiny_model_dir)), AdapterConfig(method="lora", rank=4, alpha=8))
    if not mapped():
        pytest.skip("this transformers copies the weights instead of mapping the file")
    groups = attach(model, groups=True).groups
    gc.collect()
    assert groups and not mapped()


def test_groups_under_gradient_checkpointing(tiny_tokenizer, monkeypatch):
    """The recomputed forward groups again (the stash is per call): same loss and gradients."""
    model = _lora(tiny_tokenizer, checkpointing=True)
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    plain = loss_and_grads(model, batches)
    groups = attach(model, groups=True).groups
    calls = _counting(monkeypatch)
    assert_same(loss_and_grads(model, batches), plain)
    assert len(calls) == 2 * len(groups)  # forward, and the forward recomputed in backward


def spy_joined(monkeypatch) -> list:
    """Per group backward: (group size, whether its output gradient was taken as it came, no copy)."""
    import tunesmith.train.kernels.groups as fg

    taken = []
    joined = fg._joined
    monkeypatch.setattr(
        fg,
        "_joined",
        lambda grads, sizes, like: (
            taken.append((len(sizes), (out := joined(grads, sizes, like)).data_ptr() == grads[0].data_ptr())) or out
        ),
    )
    return taken


def test_gate_up_gradients_reach_the_group_without_a_copy(tiny_tokenizer, monkeypatch):
    model = _lora(tiny_tokenizer)
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    plain = loss_and_grads(model, batches)
    attach(model, groups=True)
    taken = spy_joined(monkeypatch)
    assert_same(loss_and_grads(model, batches), plain)
    mlp = [same for n, same in taken if n == 2]
    assert len(mlp) == model.config.num_hidden_layers and all(mlp)  # the SwiGLU node's ∂gate/∂up, as they are
