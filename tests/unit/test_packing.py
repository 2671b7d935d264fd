"""Packing: row layout, and that a packed batch trains exactly like its samples run one by one."""

import pytest
import torch

from tests.tiny import make_tiny_model
from tunesmith.data.formats import Example
from tunesmith.data.packing import Row, collate, pack, unpacked
from tunesmith.data.sft import IGNORE, Sample, tokenize_example
from tunesmith.train.loss import token_loss

PAD = 0


def fake(n, first=10):
    ids = list(range(first, first + n))
    return Sample(input_ids=ids, labels=[IGNORE] + ids[1:])


def test_rows_are_full_first_fit_decreasing_with_restarting_positions():
    samples = [fake(n, 10 * i) for i, n in enumerate([3, 7, 5, 2, 6, 1])]
    rows = pack(samples, seq_len=8, pad_id=PAD)
    # decreasing: 7 → row 0; 6 → row 1; 5 → row 2; 3 → row 2; 2 → row 1; 1 → row 0
    assert [r.input_ids[:1] for r in rows] == [[10], [40], [20]]
    assert rows[0] == Row(
        input_ids=list(range(10, 17)) + [50],
        labels=[IGNORE] + list(range(11, 17)) + [IGNORE],
        position_ids=list(range(7)) + [0],
        length=8,
    )
    assert rows[1].position_ids == list(range(6)) + [0, 1]
    assert rows[2].position_ids == list(range(5)) + [0, 1, 2]
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) == 8 for r in rows)
    tail = pack([fake(5)], seq_len=8, pad_id=PAD)[0]  # padding: its own segment, no labels
    assert tail.input_ids[5:] == [PAD] * 3 and tail.labels[5:] == [IGNORE] * 3 and tail.position_ids[5:] == [0, 1, 2]
    assert pack(samples, 8, PAD) == rows  # deterministic


def test_every_sample_lands_once_in_a_few_rows():
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    samples = [fake(n, 1000 * i + 1) for i, n in enumerate(lengths)]
    rows = pack(samples, seq_len=32, pad_id=PAD)
    seen = sorted(t // 1000 for r in rows for t, p in zip(r.input_ids, r.position_ids) if p == 0 and t != PAD)
    assert seen == list(range(200))
    assert len(rows) <= sum(lengths) // 32 + 2  # first-fit decreasing wastes little


def test_pack_rejects_what_sft_should_have_prevented():
    with pytest.raises(ValueError, match="more than seq_len"):
        pack([fake(9)], seq_len=8, pad_id=PAD)
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        pack([Sample([1, 2], [1, 2])], seq_len=8, pad_id=PAD)


def test_collate_right_pads():
    batch = collate(unpacked([fake(2), fake(4)], PAD), PAD)
    assert batch["input_ids"].tolist() == [[10, 11, PAD, PAD], [10, 11, 12, 13]]
    assert batch["labels"].tolist() == [[IGNORE, 11, IGNORE, IGNORE], [IGNORE, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert all(t.dtype == torch.long for t in batch.values())


# ---------------------------------------------------------------- equivalence on a real model

CONVERSATIONS = [
    [("user", "What is the capital of Zorbia?"), ("assistant", "The capital of Zorbia is Quell.")],
    [("user", "Hi"), ("assistant", "42")],
    [
        ("system", "Answer briefly."),
        ("user", "How many moons does Vantor have?"),
        ("assistant", "Three."),
        ("user", "Who founded the Lumen Guild?"),
        ("assistant", "It was founded by Ada Marrow in 1874."),
    ],
    [("user", "The quick brown fox?"), ("assistant", "jumps over the lazy dog.")],
    [("user", "Answer briefly. What is the answer?"), ("assistant", "The answer is 42.")],
]


def samples_for(tok, train_on_prompt):
    out = []
    for turns in CONVERSATIONS:
        ex = Example(messages=[{"role": r, "content": c} for r, c in turns], text=None, where="t:1")
        out.append(tokenize_example(tok, ex, max_length=512, overlong="truncate", train_on_prompt=train_on_prompt))
    return out


def loss_and_grads(model, batches):
    """Summed loss over all batches divided by their total label count, and its gradients."""
    model.zero_grad()
    total, n_total = 0.0, 0
    for batch in batches:
        loss_sum, n = token_loss(model, **batch)
        loss_sum.backward()
        total, n_total = total + loss_sum.item(), n_total + n
    grads = {name: p.grad / n_total for name, p in model.named_parameters() if p.requires_grad}
    return total / n_total, grads


def assert_same(a, b, tol=1e-5):
    assert a[0] == pytest.approx(b[0], abs=tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("attn,train_on_prompt", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_packed_batch_equals_samples_one_by_one(tiny_tokenizer, train_on_prompt, attn):
    model = make_tiny_model(len(tiny_tokenizer))
    model.set_attn_implementation(attn)
    samples = samples_for(tiny_tokenizer, train_on_prompt)
    seq_len = max(len(s.input_ids) for s in samples) + 8
    rows = pack(samples, seq_len, PAD)
    assert len(rows) < len(samples)
    for r in rows:  # positions count up within a sample and restart at 0 where the next one starts
        assert r.position_ids[0] == 0
        assert all(b in (a + 1, 0) for a, b in zip(r.position_ids, r.position_ids[1:]))
    padded = sum(r.n_real < len(r.input_ids) for r in rows)  # tail padding is a segment of its own
    assert sum(r.position_ids.count(0) for r in rows) == len(samples) + padded
    assert any(r.position_ids.count(0) >= 3 for r in rows)  # some row holds 2+ samples and padding

    alone = loss_and_grads(model, [collate(unpacked([s], PAD), PAD) for s in samples])
    packed = loss_and_grads(model, [collate(rows, PAD)])
    assert_same(packed, alone)
    padded = loss_and_grads(model, [collate(unpacked(samples, PAD), PAD)])  # right padding needs no mask
    assert_same(padded, alone)

    # The test can fail: without position restarts the samples of a row attend to each other.
    flat = collate(rows, PAD)
    flat["position_ids"] = torch.arange(seq_len).expand(len(rows), -1).clone()
    leaky = loss_and_grads(model, [flat])
    with pytest.raises(AssertionError):
        assert_same(leaky, alone)
    assert max((leaky[1][k] - alone[1][k]).abs().max().item() for k in alone[1]) > 1e-3
