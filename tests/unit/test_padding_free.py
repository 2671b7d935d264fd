"""Padding-free training (`train.attention`): a flattened micro-batch with per-sample attention
gives the same loss and gradients as each sample run alone with plain SDPA — for the base model,
a LoRA model and with gradient checkpointing — and the model is plain SDPA again afterwards."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.tiny import make_tiny_model
from tests.unit.test_packing import PAD, assert_same, fake, loss_and_grads, samples_for
from tunesmith.data.packing import IGNORE, collate, pack, unpacked
from tunesmith.train.kernels import attach, attention
from tunesmith.train.kernels.attention import VARLEN, flatten


def test_flatten_drops_padding_and_masks_each_rows_first_target():
    rows = pack([fake(5, 10), fake(2, 20), fake(4, 30)], seq_len=6, pad_id=PAD)  # [5] [4, 2] → 5+pad, 4+2
    batch = flatten(rows)
    assert batch["input_ids"].shape == (1, 11)
    assert batch["input_ids"][0].tolist() == list(range(10, 15)) + list(range(30, 34)) + [20, 21]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    assert batch["labels"][0].tolist() == [IGNORE, 11, 12, 13, 14, IGNORE, 31, 32, 33, IGNORE, 21]
    # pretraining blocks label their first token: flattened, it must not be predicted from the previous block
    from tunesmith.data.packing import Row

    blocks = [Row([5, 6, 7], [5, 6, 7], [0, 1, 2]), Row([8, 9], [8, 9], [0, 1])]
    assert flatten(blocks)["labels"][0].tolist() == [IGNORE, 6, 7, IGNORE, 9]


def _lora(model):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)


def test_flatten_pads_to_a_multiple_with_a_segment_of_its_own():
    rows = pack([fake(5, 10), fake(2, 20), fake(4, 30)], seq_len=6, pad_id=PAD)  # 11 real tokens
    batch = flatten(rows, multiple=8, pad_id=PAD)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["input_ids"][0, 11:].tolist() == [PAD] * 5
    assert batch["position_ids"][0, 9:].tolist() == [0, 1, 0, 1, 2, 3, 4]  # restarts: attends to nothing real
    assert batch["labels"][0, 11:].tolist() == [IGNORE] * 5
    assert flatten(rows, multiple=11)["input_ids"].shape == (1, 11)


@pytest.mark.parametrize("variant", ["full", "lora", "checkpointing", "packed", "padded"])
def test_padding_free_equals_samples_one_by_one(tiny_tokenizer, variant, monkeypatch):
    model = make_tiny_model(len(tiny_tokenizer))
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "lora":
        model = _lora(model)
    model.train()
    samples = samples_for(tiny_tokenizer, False)
    rows = (
        pack(samples, max(len(s.input_ids) for s in samples) + 8, PAD)
        if variant == "packed"
        else unpacked(samples, PAD)
    )
    alone = loss_and_grads(model, [collate(unpacked([s], PAD), PAD) for s in samples])

    previous = attach(model, varlen=True)
    assert previous.previous_attention == "sdpa"
    padding = {"multiple": 32, "pad_id": PAD} if variant == "padded" else {}
    try:
        fast = loss_and_grads(model, [flatten(rows, **padding)])
    finally:
        previous.restore()
    assert_same(fast, alone)
    inner = model.get_base_model() if variant == "lora" else model
    assert inner.config._attn_implementation == "sdpa"

    # transformers' own answer for the flattened row (a block-diagonal mask from the position
    # restarts) agrees, at the cost this path avoids
    assert_same(loss_and_grads(model, [flatten(rows)]), alone)

    # The comparison can fail: one causal segment per row lets samples attend to earlier ones.
    monkeypatch.setattr(attention, "_segments", lambda pos, batch: [[(0, pos.shape[-1])]] * batch)
    previous = attach(model, varlen=True)
    leaky = loss_and_grads(model, [flatten(rows)])
    previous.restore()
    with pytest.raises(AssertionError):
        assert_same(leaky, alone)


def test_generation_after_restore_is_unchanged(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer))
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        before = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        previous = attach(model, varlen=True)
        during = model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # masks and cache: plain SDPA
        previous.restore()
        after = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(before, during) and torch.equal(before, after)


def test_models_it_cannot_serve_keep_padded_batches(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer))
    model.config.sliding_window = 4  # a window the per-sample causal kernel would ignore
    assert not attach(model, varlen=True).flat
    assert model.config._attn_implementation == "sdpa"
    assert VARLEN not in str(model.config._attn_implementation)


def test_segment_flash_node_matches_sdpa_per_segment():
    """The one-node flash path (CPU, one flattened row): output and q/k/v gradients equal SDPA run
    on each segment alone, with GQA; in fp64, and by gradcheck."""
    import torch.nn.functional as F

    from tunesmith.train.kernels.attention import SegmentFlashFn

    torch.manual_seed(0)
    segments = [(0, 5), (5, 12), (12, 13), (13, 20)]
    q = torch.randn(1, 4, 20, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 20, 4, 8, dtype=torch.float64)
    got = SegmentFlashFn.apply(q, k, v, segments, 0.3)
    want = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=0.3, enable_gqa=True
            )
            for s, e in segments
        ],
        2,
    )
    want = want.transpose(1, 2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad))
    assert got.is_contiguous()
    torch.autograd.gradcheck(lambda *t: SegmentFlashFn.apply(*t, segments, 0.3), (q, k, v))
