"""The training loop: plain PyTorch, CPU first, resumable bit for bit.

Contract: `run_training(cfg)` fine-tunes `cfg.model.name` on `cfg.data` with `cfg.adapter`
and writes into `cfg.train.output_dir`:
  - the model: a PEFT adapter dir (lora/dora/qlora) or an HF safetensors dir (full), beside the
    tokenizer with its chat template and the resolved config `tunesmith.yaml`;
  - `metrics.jsonl` (one row per step, plus validation rows), `loss.png`, `run.json`
    (summary: steps, tokens, wall time, peak RSS, losses, data stats);
  - `checkpoints/step-N/` every `save_every` steps and at the end.
A run dir holding a different run is refused before anything is written. With
`train.resume=auto` (or a checkpoint path) the run continues from the newest checkpoint and
ends with the same weights an uninterrupted run would have, bit for bit.

Data order is a pure function of (seed, epoch): epoch e visits rows in
`randperm(seed + e)`, sharded by rank; the position (epoch, offset) is checkpointed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.adapters import RUN_CONFIG, apply_method, count_parameters
from tunesmith.compute import gemm_rows_multiple, resolve_precision
from tunesmith.config import Config, config_hash, load_config, save_config
from tunesmith.data.packing import collate, pack, unpacked
from tunesmith.data.sft import build_datasets, ensure_chat_template
from tunesmith.errors import UserError
from tunesmith.models import load_model, load_tokenizer, pick_device, resolve_model, torch_dtype, tunesmith_home
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.attention import flatten, restore, use_varlen
from tunesmith.train.distributed import (
    Dist, all_reduce_sum, barrier, cleanup, clip_grad_norm, full_state_dict, inject_fault, no_sync, same_on_all_ranks,
    setup, wrap,
)
from tunesmith.train.fused_groups import restore_groups, use_fused_groups
from tunesmith.train.fused_mlp import restore_mlp, use_fused_mlp
from tunesmith.train.fused_norm import restore_norm, use_fused_norm
from tunesmith.train.fused_rope import restore_rope, use_fused_rope
from tunesmith.train.loss import LossModule, can_embed_into_grad
from tunesmith.train.records import Records, require_tensorboard

# Keys that may change between a run and its resume without making it another run.
RESUMABLE_CHANGES = (
    "train.resume", "train.progress", "train.tensorboard", "train.log_every", "train.keep_last",
    "train.save_every", "train.eval_every", "train.max_steps", "train.epochs", "train.device",
    "train.threads", "data.cache_dir", "compare", "pipeline",
    # a different split of the same global batch (checked on resume): processes, strategy
    "train.batch_size", "train.grad_accum", "train.strategy", "train.dist_timeout_s", "train.forward_tokens",
    # the same rows and targets, laid out without padding: equal up to fp32 rounding
    "train.padding_free", "adapter.fused", "train.fused_mlp", "train.fused_norm",
    "train.fused_groups", "train.fused_rope",
)
CHECKPOINTS = "checkpoints"


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


def check_output_dir(out: Path, cfg: Config, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> Path | None:
    """Refuse a dir holding another run; return the checkpoint to resume from, if any."""
    resume = cfg.train.resume
    if resume not in ("never", "auto"):
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise UserError(f"config key train.resume: {resume} is not a checkpoint dir (no state.json)")
        return path
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"config key train.output_dir: {out} exists and is not a directory")
    saved = out / RUN_CONFIG
    if not saved.is_file():
        if any(out.iterdir()):
            raise UserError(f"config key train.output_dir: {out} is not empty and holds no tunesmith run; choose another dir")
        return None
    try:
        previous = load_config(saved)
    except UserError:
        raise UserError(f"{saved}: this output dir holds a run whose config cannot be read; choose another dir") from None
    if config_hash(previous, ignore) != config_hash(cfg, ignore):
        raise UserError(
            f"config key train.output_dir: {out} holds another run (different config); choose another dir"
        )
    latest = ckpt.latest_checkpoint(out / CHECKPOINTS)
    if resume == "never":
        raise UserError(
            f"config key train.output_dir: {out} already holds this run; pass train.resume=auto "
            "(or --resume) to continue it, or choose another dir"
        )
    return latest


def _make_rows(samples, cfg: Config, pad_id: int):
    if cfg.data.packing:
        return pack(samples, cfg.data.max_length, pad_id)
    return unpacked(samples, pad_id)


class RowStream:
    """Micro-batches over epochs; (epoch, offset) is the whole state needed to resume.

    The order and `offset` are global, not per rank: a micro-batch is the next
    `batch_size × world` rows of the epoch's permutation and rank r takes every world-th of
    them. So N processes with batch B see, step by step, the same rows as one process with
    batch B×N (or B and grad_accum N), and a checkpoint resumes with any number of processes.
    An epoch is cut to a multiple of `world` rows (at most world−1 dropped) so every rank
    always gets the same number of rows, and a step never runs into the next epoch.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, dist: Dist, epoch: int = 0, offset: int = 0):
        self.n_rows, self.batch_size, self.seed, self.dist = n_rows, batch_size, seed, dist
        self.epoch, self.offset = epoch, offset
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        keep = self.n_rows - self.n_rows % self.dist.world
        return torch.randperm(self.n_rows, generator=gen).tolist()[:keep]

    def next(self) -> list[int]:
        if self.offset >= len(self._order):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        chunk = self._order[self.offset : self.offset + self.batch_size * self.dist.world]
        self.offset += len(chunk)
        return chunk[self.dist.rank :: self.dist.world]

    def next_step(self, grad_accum: int) -> list[list[int]]:
        """Up to `grad_accum` micro-batches, stopping at the end of the epoch."""
        batches = [self.next()]
        while len(batches) < grad_accum and self.offset < len(self._order):
            batches.append(self.next())
        return batches

    def rows_per_epoch(self) -> int:
        return len(self._order)


def split_rows(rows: list, budget: int) -> list[list]:
    """Consecutive groups of `rows` of at most `budget` real tokens each (a longer row goes alone);
    `budget` 0 keeps them together. The loss is normalised by the tokens of the whole step, so the
    split changes memory (activations live for one group), not the gradient."""
    if budget <= 0:
        return [rows]
    groups, current, n = [], [], 0
    for row in rows:
        if current and n + row.n_real > budget:
            groups.append(current)
            current, n = [], 0
        current.append(row)
        n += row.n_real
    return groups + [current]


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


@dataclass
class TrainResult:
    output_dir: Path
    model: torch.nn.Module  # the trained model (PeftModel for lora/dora), in eval mode
    tokenizer: object
    summary: dict


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


def run_training(cfg: Config, rows=None) -> TrainResult:
    """`rows`, when given, replaces the SFT data: a callable `tokenizer → (train rows, validation
    rows, DataStats)` (pre-training blocks, `tunesmith.pretrain`). The section that does not
    feed the run (`pretrain` for fine-tuning, `data` for pre-training) is left out of the hash
    that decides whether an output dir holds this same run."""
    t = cfg.train
    out = Path(t.output_dir)
    ignore = RESUMABLE_CHANGES + (("data",) if rows is not None else ("pretrain",))
    device = pick_device(t.device)
    dist = setup(device, t.strategy, t.dist_timeout_s)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if t.precision == "fp16" and device.type != "cuda":
        raise UserError("config key train.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    resume_from = check_output_dir(out, cfg, ignore)
    if t.tensorboard:
        require_tensorboard()
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    resolved = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(resolved, cfg.model.trust_remote_code, cfg.model.revision)
    pad_id = tokenizer.pad_token_id
    if rows is not None:
        train_rows, val_rows, stats = rows(tokenizer)
    else:
        ensure_chat_template(tokenizer, cfg.data.chat_template)
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else tunesmith_home() / "data-cache"
        train_samples, val_samples, stats = build_datasets(cfg.data, tokenizer, t.seed, cache_dir)
        train_rows = _make_rows(train_samples, cfg, pad_id)
        val_rows = _make_rows(val_samples, cfg, pad_id) if val_samples else []
    if len(train_rows) < dist.world:
        raise UserError(f"data: {len(train_rows)} training rows cannot be shared by {dist.world} processes")

    precision, frozen_dtype = resolve_precision(t, cfg.adapter.method, device)
    # frozen_dtype=bf16 loads in bf16: no fp32 copy of the frozen base is ever made
    bf16_base = frozen_dtype == "bf16" and cfg.adapter.method != "full"
    model = load_model(
        resolved, dtype=torch.bfloat16 if bf16_base else torch.float32, trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision, attn_implementation=cfg.model.attn_implementation,
    )
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_method(model, cfg.adapter, frozen_dtype)
    previous_attention = use_varlen(model) if t.padding_free else None
    fused_mlps = use_fused_mlp(model) if t.fused_mlp else []
    fused_norms = use_fused_norm(model) if t.fused_norm else []
    fused_ropes = use_fused_rope(model) if t.fused_rope and previous_attention is not None else []
    if previous_attention is None:
        make_batch = lambda rows: collate(rows, pad_id)  # noqa: E731
    else:
        multiple = gemm_rows_multiple(torch_dtype(precision), device)
        make_batch = functools.partial(flatten, multiple=multiple, pad_id=pad_id)
    model.to(device)
    # after the move: a group's layers are views of one buffer, which .to() would split
    fused_groups = use_fused_groups(model) if t.fused_groups and not dist.enabled else []
    model.train()
    trainable, total_params = count_parameters(model)
    embed_into_grad = not dist.enabled and can_embed_into_grad(model)
    trainer = wrap(LossModule(model, embed_into_grad), dist)  # before the optimizer: FSDP replaces the parameters
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # fused: one kernel per parameter instead of ~8 passes over memory (a sixth of a full fine-tuning
    # step on 2 CPU cores); FSDP's sharded DTensor parameters keep the default implementation
    fused = device.type in ("cpu", "cuda") and not (dist.enabled and dist.strategy == "fsdp")
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=tuple(t.betas), fused=fused or None,
    )
    # FSDP's forwards all-gather layer by layer, so every rank must run as many: one per micro-batch
    forward_tokens = 0 if dist.enabled and dist.strategy == "fsdp" else t.forward_tokens
    stream = RowStream(len(train_rows), t.batch_size, t.seed, dist)
    global_batch = t.batch_size * t.grad_accum * dist.world
    steps_per_epoch = max(1, math.ceil(stream.rows_per_epoch() / global_batch))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, t.lr_schedule, t.min_lr_ratio)
    )

    step, tokens_seen, elapsed_before, last_loss = 0, 0, 0.0, None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, global_batch)
        step, tokens_seen, last_loss = state["step"], state["tokens_seen"], state.get("last_loss")
        elapsed_before = state.get("elapsed_s", 0.0)
        stream = RowStream(len(train_rows), t.batch_size, t.seed, dist, state["epoch"], state["offset"])
    if not same_on_all_ranks(step, dist, device):  # every rank reads the checkpoint itself
        raise UserError(
            f"config key train.output_dir: the processes found different checkpoints in {out}; "
            "with several machines it must be on a filesystem they all share"
        )
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / RUN_CONFIG)
    barrier(dist)

    amp_dtype = None if precision == "fp32" else torch_dtype(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    records = Records(out, t.tensorboard, step) if dist.main else None
    bar = None
    if dist.main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    if dist.main:
        print(
            f"tunesmith: {cfg.adapter.method} on {cfg.model.name}: {trainable:,} of {total_params:,} parameters "
            f"trainable; {stats.n_examples} examples ({stats.n_truncated} truncated, {stats.n_dropped} dropped) "
            f"→ {len(train_rows)} rows of ≤{cfg.data.max_length} tokens; {total_steps} steps; {precision} compute"
            + (f"; resuming at step {step}" if resume_from is not None else ""),
            flush=True,
        )

    started = time.perf_counter()
    val_loss = None
    while step < total_steps:
        inject_fault(dist, step + 1)
        micro = [[train_rows[i] for i in ids] for ids in stream.next_step(t.grad_accum)]
        batches = [make_batch(group) for rows in micro for group in split_rows(rows, forward_tokens)]
        step_start = time.perf_counter()
        loss_total, global_tokens = accumulate_gradients(trainer, batches, dist, device, autocast, scaler)
        if scaler:
            scaler.unscale_(optimizer)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = clip_grad_norm(params, max_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        # real tokens: padding is not work done
        step_tokens = int(all_reduce_sum(sum(r.n_real for rows in micro for r in rows), dist, device))
        tokens_seen += step_tokens
        last_loss = all_reduce_sum(loss_total, dist, device) / max(global_tokens, 1)
        step_time = time.perf_counter() - step_start
        if dist.main:
            if step % t.log_every == 0 or step == total_steps:
                records.log({
                    "step": step, "epoch": round(stream.epoch + stream.offset / max(1, stream.rows_per_epoch()), 4),
                    "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                    "tokens": step_tokens, "step_s": round(step_time, 4), "tok_per_s": round(step_tokens / step_time, 1),
                    "elapsed_s": round(elapsed_before + time.perf_counter() - started, 3),
                })
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / step_time:.0f}")
                bar.update(1)
        if t.eval_every and step % t.eval_every == 0 and step < total_steps and val_rows:
            val_loss = evaluate(trainer, val_rows, t.batch_size, make_batch, device, dist, autocast)
            if dist.main:
                records.log({"step": step, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(val_loss), 4)})
        if (t.save_every and step % t.save_every == 0) or step == total_steps:
            state = {
                "epoch": stream.epoch, "offset": stream.offset, "tokens_seen": tokens_seen, "last_loss": last_loss,
                "elapsed_s": elapsed_before + time.perf_counter() - started,
                "config_hash": config_hash(cfg, ignore), "global_batch": global_batch, "world_size": dist.world,
            }
            # every rank: under FSDP saving gathers the shards; only rank 0 writes
            ckpt.save_checkpoint(out / CHECKPOINTS, step, model, optimizer, scheduler, state, t.keep_last, dist.main)
            barrier(dist)
    if bar is not None:
        bar.close()

    if val_rows:
        val_loss = evaluate(trainer, val_rows, t.batch_size, make_batch, device, dist, autocast)
        if dist.main:
            records.log({"step": step, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(val_loss), 4)})
    wall = elapsed_before + time.perf_counter() - started
    restore(model, previous_attention)  # generation (chat, compare) needs masks and the KV cache
    restore_mlp(fused_mlps)
    restore_norm(fused_norms)
    restore_rope(fused_ropes)
    restore_groups(fused_groups)
    summary = {}
    gathered = full_state_dict(model) if dist.enabled and dist.strategy == "fsdp" else None  # collective
    if dist.main:
        save_model(model, tokenizer, out, gathered)
        records.close()
        records.plot(out / "loss.png")
        summary = {
            "method": cfg.adapter.method, "base_model": cfg.model.name, "steps": step,
            "tokens_seen": tokens_seen, "train_wall_s": round(wall, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "final_train_loss": last_loss, "final_val_loss": val_loss,
            "trainable_params": trainable, "total_params": total_params,
            "train_rows": len(train_rows), "val_rows": len(val_rows), "device": str(device),
            "world_size": dist.world, "precision": precision, "frozen_dtype": frozen_dtype, "data": stats.__dict__,
        }
        (out / "run.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(
            f"tunesmith: done in {wall:.1f}s, final train loss {last_loss or float('nan'):.4f}"
            + (f", validation loss {val_loss:.4f}" if val_loss is not None else "")
            + f" → {out}",
            flush=True,
        )
    cleanup(dist)
    model.eval()
    return TrainResult(out, model, tokenizer, summary)


def save_model(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Write the adapter (or full model) + tokenizer into a temp dir, then move files in.
    `state_dict`: whole tensors gathered from FSDP shards, saved in place of the model's own."""
    tmp = out / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.fsync_dir(out)
