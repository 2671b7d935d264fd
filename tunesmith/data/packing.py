"""Token samples → rows the model runs on, and rows → batch tensors.

Contract:
- `pack(samples, seq_len, pad_id)` puts several samples in each row of exactly `seq_len`
  tokens, first-fit decreasing (deterministic for a given input order). `position_ids` restart
  at 0 for every sample; the tail padding has labels -100 and positions 0, 1, … as a segment of
  its own. A sample longer than `seq_len`, empty, or whose labels[0] is not -100 is a bug
  upstream (sft truncates, drops and masks) and raises ValueError.
- `unpacked(samples, pad_id)` is one sample per row, unpadded (collate pads).
- `collate(rows, pad_id)` stacks rows into `input_ids`, `labels`, `position_ids` tensors
  [B, T], right-padding to the longest row with `pad_id`, labels -100 and positions that
  continue the row's last segment.

Why this isolates samples: the model is called with `attention_mask=None` and these
`position_ids`; transformers then derives a block-diagonal causal mask from the position
restarts (`masking_utils.find_packed_sequence_indices`), and RoPE sees each sample at the
positions it would have alone. So a packed row gives each sample the same logits as running
it by itself; `labels[0] == -100` keeps the loss from predicting a sample's first token from
the previous sample's last. Right padding needs no mask: attention is causal, so real tokens
never see the pads that follow them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.sft import IGNORE, Sample


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    length: int | None = None  # real tokens; the rest is tail padding. None: all of them

    @property
    def n_real(self) -> int:
        return len(self.input_ids) if self.length is None else self.length


def pack(samples: list[Sample], seq_len: int, pad_id: int) -> list[Row]:
    for i, s in enumerate(samples):
        _check(s, i)
        if len(s.input_ids) > seq_len:
            raise ValueError(f"sample {i} has {len(s.input_ids)} tokens, more than seq_len={seq_len}")
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free = _FirstFit(len(samples), seq_len)
    for i in order:
        b = free.place(len(samples[i].input_ids))
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
    rows = []
    for members in bins:
        ids, labels, pos = [], [], []
        for i in members:
            s = samples[i]
            ids += s.input_ids
            labels += s.labels
            pos += range(len(s.input_ids))
        pad = seq_len - len(ids)
        rows.append(Row(ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(pad)), len(ids)))
    return rows


class _FirstFit:
    """Bins with free space, answering "first bin with at least n free" in O(log bins).

    A max segment tree over the free space of every bin that could ever be opened (one per
    sample); unopened bins are empty, so the first-fit answer opens a new bin exactly when no
    open one has room. A plain scan would be quadratic on large datasets."""

    def __init__(self, n_bins: int, capacity: int):
        self.size = 1
        while self.size < max(n_bins, 1):
            self.size *= 2
        self.tree = [capacity] * (2 * self.size)

    def place(self, n: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= n else 2 * node + 1
        self.tree[node] -= n
        b = node - self.size
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2
        return b


def unpacked(samples: list[Sample], pad_id: int) -> list[Row]:
    del pad_id  # same signature as pack; padding happens in collate
    rows = []
    for i, s in enumerate(samples):
        _check(s, i)
        rows.append(Row(list(s.input_ids), list(s.labels), list(range(len(s.input_ids)))))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        pad = width - len(r.input_ids)
        start = r.position_ids[-1] + 1 if r.position_ids else 0
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE] * pad)
        # continuing the positions keeps the pads in the last segment: no extra packed segment,
        # so an unpacked batch keeps the plain causal mask
        pos.append(r.position_ids + list(range(start, start + pad)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
    }


def _check(s: Sample, i: int) -> None:
    if not s.input_ids or len(s.input_ids) != len(s.labels):
        raise ValueError(f"sample {i}: empty, or input_ids and labels differ in length")
    if s.labels[0] != IGNORE:
        raise ValueError(f"sample {i}: labels[0] must be {IGNORE} (the token before it belongs to another sample)")
