"""Every row of `kernels.FAMILIES` trains on the fast path exactly as transformers' own modules do —
a tiny random Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms) — and a family
outside the table (Phi-3: fused qkv) trains on the generic path, untouched."""

import pytest
import torch

from tests.tiny import make_family_model
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.adapters.methods import apply_method
from tunesmith.config import AdapterConfig
from tunesmith.data.packing import collate, unpacked
from tunesmith.train.kernels import FAMILIES, attach, family_of
from tunesmith.train.kernels.attention import flatten
from tunesmith.train.kernels.mlp import SwiGLUDownFn
from tunesmith.train.kernels.norm import RMSNormFn
from tunesmith.train.kernels.rope import RopeSegmentFlashFn


def _counted(apply, calls, name):
    return lambda *args: calls.append(name) or apply(*args)


ALL = dict(varlen=True, mlp=True, norm=True, rope=True, groups=True, max_length=512)


def _model(family, tok, method):
    model = make_family_model(family, len(tok))
    if method != "full":
        torch.manual_seed(0)
        model = apply_method(model, AdapterConfig(method=method, rank=4, alpha=8))
        torch.manual_seed(1)  # random B: every gradient path non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model.train()


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_on_the_fast_path_as_on_its_own_modules(tiny_tokenizer, family, method, monkeypatch):
    model = _model(family, tiny_tokenizer, method)
    assert family_of(model) == family
    samples = samples_for(tiny_tokenizer, False)
    plain = loss_and_grads(model, [collate(unpacked(samples, PAD), PAD)])
    fast = attach(model, **ALL)
    assert fast.flat
    layers = model.config.num_hidden_layers
    kinds = [type(m).__name__ for m in fast.patched]
    row = FAMILIES[family]
    assert kinds.count(row.attention) == layers and kinds.count(row.mlp) == layers
    assert kinds.count(row.norm) == 2 * layers + 1 + (2 * layers if row.qk_norm else 0)
    assert len(fast.groups) == 2 * layers  # q/k/v and gate/up of every layer
    calls = []
    for node in (RopeSegmentFlashFn, SwiGLUDownFn, RMSNormFn):
        monkeypatch.setattr(node, "apply", _counted(node.apply, calls, node.__name__))
    assert_same(loss_and_grads(model, [flatten(unpacked(samples, PAD), multiple=8, pad_id=PAD)]), plain)
    assert calls.count("RopeSegmentFlashFn") == layers and calls.count("SwiGLUDownFn") == layers
    assert calls.count("RMSNormFn") == kinds.count(row.norm)
    fast.restore()
    assert not any("forward" in vars(m) for m in model.modules())
    assert_same(loss_and_grads(model, [collate(unpacked(samples, PAD), PAD)]), plain)


def test_a_family_outside_the_table_trains_on_the_generic_path(tiny_tokenizer):
    model = _model("phi3", tiny_tokenizer, "lora")
    assert family_of(model) is None
    samples = samples_for(tiny_tokenizer, False)
    plain = loss_and_grads(model, [collate(unpacked(samples, PAD), PAD)])
    fast = attach(model, **ALL)
    assert not fast.patched and not fast.groups
    # per-sample attention serves any model that dispatches through transformers' attention interface
    batch = flatten(unpacked(samples, PAD)) if fast.flat else collate(unpacked(samples, PAD), PAD)
    assert_same(loss_and_grads(model, [batch]), plain)
    fast.restore()


def test_a_sliding_window_shorter_than_the_samples_keeps_padded_batches(tiny_tokenizer):
    model = make_family_model("mistral", len(tiny_tokenizer))
    assert attach(model, varlen=True, max_length=512).flat  # window 4096 ≥ every sample: exact
    model = make_family_model("mistral", len(tiny_tokenizer))
    model.config.sliding_window = 16
    assert not attach(model, varlen=True, max_length=512).flat
