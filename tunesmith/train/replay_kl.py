"""Replay held to the base model's distribution (`data.replay_loss: kl`).

Contract:
- `mark(train_samples, n_replay)` → (samples, unique): the last `n_replay` training samples are the
  replay samples (`data/replay.py` appends them); each of their label positions becomes a soft
  label `SOFT − j` (`train/loss.py`), j counting the label positions of the distinct replay samples
  in order, so a sample drawn twice points at the same rows. `unique` are those distinct samples with
  their hard labels, in that order.
- `base_targets(run, unique)` → (ids [N, k] int32, p [N, k] fp32, rest [N] fp32): the model's top-`K`
  next-token probabilities at every label position of `unique`, and the mass of all other tokens,
  from one no-grad pass in eval mode. Called before the first step, when the model still is the base
  (adapters start as a no-op; a full fine-tune has not moved yet), in the run's precision. The
  pass's reused buffers and freed heap are given back afterwards, so training does not carry them.
- `targets(run, unique, resume_from)`: computed on a fresh start and written to
  `RUN/replay_targets.safetensors` (atomically, rank 0); on resume, when the model no longer is the
  base, read back from the checkpoint's run dir (or this one) and copied here when missing, so the
  resumed run trains against the same targets bit for bit. None there that matches the replay
  samples is a `UserError`.

Why top-k plus a rest bucket: the full distribution (49,152 floats a position on SmolLM2) would be
gigabytes for a few thousand replay answers; k = 16 buckets and "everything else" keep the KL exact
over those k + 1 events, so the model cannot move mass into the tail unseen, as a renormalised
top-k would let it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunesmith.data.packing import unpacked
from tunesmith.data.sft import IGNORE, Sample
from tunesmith.errors import UserError
from tunesmith.io import fsync_dir, fsync_file
from tunesmith.rundir import REPLAY_TARGETS
from tunesmith.train.budget import return_freed_heap
from tunesmith.train.kernels.scratch import release
from tunesmith.train.loss import CHUNK, SOFT, plain_head, unwrap

K = 16
FILE = REPLAY_TARGETS
BATCH = 8  # replay samples a forward


def mark(train_samples: list[Sample], n_replay: int) -> tuple[list[Sample], list[Sample]]:
    if not n_replay:
        return train_samples, []
    head, tail = train_samples[: len(train_samples) - n_replay], train_samples[len(train_samples) - n_replay :]
    first_row: dict[tuple, int] = {}
    unique: list[Sample] = []
    n_rows = 0
    marked = []
    for s in tail:
        key = (tuple(s.input_ids), tuple(s.labels))
        if key not in first_row:
            first_row[key] = n_rows
            unique.append(s)
            n_rows += sum(label != IGNORE for label in s.labels)
        j = first_row[key]
        labels = []
        for label in s.labels:
            labels.append(label if label == IGNORE else SOFT - j)
            j += label != IGNORE
        marked.append(Sample(list(s.input_ids), labels))
    return head + marked, unique


def fingerprint(unique: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in unique:
        h.update(repr((s.input_ids, s.labels)).encode())
    return h.hexdigest()


@torch.no_grad()
def base_targets(run, unique: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model, device = run.model, run.device
    inner = unwrap(model)
    plain = plain_head(inner) and hasattr(inner, "get_decoder")
    pad_id = run.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    parts = []
    try:
        with run.autocast():
            for start in range(0, len(unique), BATCH):
                batch = run.make_batch(unpacked(unique[start : start + BATCH], pad_id))
                batch = {k: v.to(device) for k, v in batch.items()}
                keep = batch["labels"][:, 1:] != IGNORE
                inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
                if plain:  # the head on the answer positions only, a chunk at a time: no [tokens × vocab] tensor
                    hidden = inner.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
                    head = inner.get_output_embeddings()
                    parts += [_top(head(h).float()) for h in hidden.split(CHUNK)]
                else:
                    parts.append(_top(model(**inputs).logits[:, :-1][keep].float()))
    finally:
        model.train(was_training)
        release()  # the fused kernels' buffers grew for 8 samples a forward; training needs one row's
        return_freed_heap()
    return tuple(torch.cat([part[i] for part in parts]) for i in range(3))


def _top(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top, ids = logits.topk(K, dim=-1)
    p = (top - logits.logsumexp(-1, keepdim=True)).exp()
    return ids.to(torch.int32).cpu(), p.cpu(), (1.0 - p.sum(-1)).clamp_min(0.0).cpu()


def targets(run, unique: list[Sample], resume_from: Path | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = Path(run.out.path) / FILE
    digest = fingerprint(unique)
    if resume_from is None:
        found, source = base_targets(run, unique), None
    else:  # the run dir the checkpoint belongs to (`RUN/checkpoints/step-N`), then this one
        found, source = None, None
        for source in dict.fromkeys((Path(resume_from).parent.parent / FILE, out)):
            found = _read(source, digest)
            if found is not None:
                break
        if found is None:
            raise UserError(
                f"{out}: the base model's replay targets this run trained against are missing or belong to other "
                "replay samples; resuming needs them (data.replay_loss: kl), or start the run afresh in another dir"
            )
    if run.dist.main and source != out:
        _write(out, found, digest)
    return found


def _read(path: Path, digest: str):
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("digest") != digest:
                return None
            return tuple(f.get_tensor(name) for name in ("ids", "p", "rest"))
    except (OSError, SafetensorError):
        return None


def _write(path: Path, found, digest: str) -> None:
    tmp = path.with_name(f".{FILE}.tmp-{os.getpid()}")
    try:
        save_file(dict(zip(("ids", "p", "rest"), found)), tmp, metadata={"digest": digest})
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
