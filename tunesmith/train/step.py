"""One optimizer step's gradients, a validation pass, and the learning-rate schedule.

Contract:
- `accumulate_gradients(trainer, batches, dist, device)`: backward over one step's micro-batches,
  the loss normalised by the label tokens of the whole step (all micro-batches, all ranks).
- `evaluate(model, rows, ...)`: the mean token loss over validation rows, every rank in step.
- `lr_factor(step, total, warmup, schedule, floor)`: linear warm-up, then cosine, linear or constant.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from tunesmith.train.distributed import Dist, all_reduce_sum, no_sync


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float) -> float:
    """Multiplier on the base lr for the update that follows `step` finished steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def evaluate(model, rows, batch_size: int, make_batch, device, dist: Dist, autocast) -> float | None:
    """`model` is the (wrapped) `LossModule`: under FSDP only its forward gathers the weights."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_batches = math.ceil(len(rows) / batch_size)
    with torch.no_grad(), autocast():
        # Every rank runs as many forwards (FSDP's all-gathers are collectives); a rank past
        # the end repeats batch 0 and does not count it.
        for i in range(dist.rank, n_batches + (-n_batches) % dist.world, dist.world):
            start = (i if i < n_batches else 0) * batch_size
            batch = {k: v.to(device) for k, v in make_batch(rows[start : start + batch_size]).items()}
            loss_sum, n = model(**batch)
            if i < n_batches:
                total, count = total + float(loss_sum), count + n
    total = all_reduce_sum(total, dist, device)
    count = all_reduce_sum(count, dist, device)
    model.train(was_training)
    return total / count if count else None


def accumulate_gradients(trainer, batches, dist: Dist, device, autocast=nullcontext, scaler=None):
    """Backward over the micro-batches of one optimizer step; returns (summed loss, tokens).

    Each micro-batch's loss sum is divided by the label-token count of the *whole* step (all
    micro-batches, all ranks), so the gradient is the mean over every label token however
    the step is split — not a mean of per-micro-batch means.
    """
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    global_tokens = all_reduce_sum(local_tokens, dist, device)
    loss_total = 0.0
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = no_sync(trainer, dist, last=i == len(batches) - 1)
        with sync, autocast():
            loss_sum, _ = trainer(**batch)
            # DDP averages gradients over ranks; multiplying by world undoes that average.
            loss = loss_sum * dist.world / max(global_tokens, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        loss_total += loss_sum.item()
    return loss_total, global_tokens
