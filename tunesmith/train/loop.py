"""The training loop: plain PyTorch, CPU first, resumable bit for bit.

Contract: `run_training(cfg)` fine-tunes `cfg.model.name` on `cfg.data` with `cfg.adapter` and
writes the run dir `cfg.train.output_dir` (layout: `tunesmith.rundir`): the model (a PEFT adapter,
or an HF safetensors dir for `full`) beside its tokenizer and the resolved config, `metrics.jsonl`,
`loss.png`, `run.json`, and `checkpoints/step-N/` every `save_every` steps, every `save_every_minutes`
and at the end; on SIGINT/SIGTERM one at the next step boundary, then `TrainingInterrupted` (`train.signals`).
A dir holding another run is refused before anything is written; the dir is locked while the run
writes it, and a step whose loss or gradient diverges stops the run (`Diverged`, exit 3) or is
skipped. With `train.resume=auto` (or a checkpoint path) the run continues from the newest
checkpoint and ends as an uninterrupted run would, bit for bit.

It runs in three phases a reader can follow: `set_up` (data, model, fast paths, optimizer, resume
point), `train_steps` (one optimizer step at a time: `one_step`, then logging, validation and
checkpoints) and `finish` (final validation, the model and summary written). The fast paths are
restored when training ends, also on error: generation needs masks and the KV cache.
"""

from __future__ import annotations

import functools
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.adapters.methods import count_parameters
from tunesmith.config import Config, config_hash
from tunesmith.data.context import context_line
from tunesmith.data.packing import collate
from tunesmith.data.sft import build_datasets, ensure_chat_template
from tunesmith.errors import UserError
from tunesmith.models import load_tokenizer, pick_device, resolve_model, tunesmith_home
from tunesmith.precision import gemm_rows_multiple, resolve_precision, torch_dtype
from tunesmith.rundir import RESUMABLE_CHANGES, RunDir
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import replay_kl
from tunesmith.train.cpu import use_threads, warn_if_busy
from tunesmith.train.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    inject_fault,
    same_on_all_ranks,
    setup,
    wrap,
)
from tunesmith.train.divergence import Guard, stop_run
from tunesmith.train.finish import TrainResult, finish
from tunesmith.train.kernels import Prepared
from tunesmith.train.kernels.attention import flatten
from tunesmith.train.loss import LossModule, can_embed_into_grad
from tunesmith.train.model import load_base, make_trainable
from tunesmith.train.records import Records
from tunesmith.train.rows import RowStream, forward_budget, make_rows, split_rows
from tunesmith.train.signals import SaveClock, StopSignals, TrainingInterrupted
from tunesmith.train.step import accumulate_gradients, evaluate, lr_factor
from tunesmith.train.tracking import check_trackers, open_trackers

__all__ = ["RESUMABLE_CHANGES", "RowStream", "TrainResult", "run_training", "split_rows"]


@dataclass
class Run:
    """Everything `set_up` builds for one run, and the counters the steps advance."""

    cfg: Config
    out: RunDir
    ignore: tuple
    device: torch.device
    dist: Dist
    tokenizer: object
    train_rows: list
    val_rows: list
    stats: object
    precision: str
    frozen_dtype: str
    fast: Prepared
    trainer: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: RowStream
    make_batch: object
    autocast: object
    scaler: object
    total_steps: int
    global_batch: int
    forward_tokens: int
    trainable: int
    total_params: int
    resumed: bool = False
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    last_loss: float | None = None
    lr: float = 0.0
    grad_norm: float = 0.0
    records: Records | None = None
    stop: StopSignals | None = None  # notes SIGINT/SIGTERM while the steps run
    guard: Guard | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def model(self):
        return self.fast.model

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def run_training(cfg: Config, rows=None) -> TrainResult:
    """`rows`, when given, replaces the SFT data: a callable `tokenizer → (train rows, validation
    rows, DataStats)` (pre-training blocks, `tunesmith.pretrain`). The section that does not
    feed the run (`pretrain` for fine-tuning, `data` for pre-training) is left out of the hash
    that decides whether an output dir holds this same run."""
    with RunDir(cfg.train.output_dir).writing():  # the output lock (rank 0); killed writes' leftovers go
        run = set_up(cfg, rows)
        # fast: restores the model's own forwards when training ends, also on error; stop: see train.signals
        with run.fast, StopSignals(enabled=not run.dist.enabled) as run.stop:
            val_loss = train_steps(run)
        return finish(run, val_loss)


# ---------------------------------------------------------------- set-up


def set_up(cfg: Config, rows=None) -> Run:
    t = cfg.train
    out = RunDir(t.output_dir)
    ignore = RESUMABLE_CHANGES + (("data",) if rows is not None else ("pretrain",))
    device = pick_device(t.device)
    dist = setup(device, t.strategy, t.dist_timeout_s)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if t.precision == "fp16" and device.type != "cuda":
        raise UserError("config key train.precision: fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    resume_from = out.resume_point(cfg, ignore)
    for path, why in out.passed_over if dist.main else ():
        print(f"tunesmith: resume: skipping {path} ({why})", flush=True)
    check_trackers(t)  # a tracker that is not installed fails before anything is written
    threads = use_threads(t.threads, "train.threads", warn=False)  # the warning: once the model is read
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    resolved = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(resolved, cfg.model.trust_remote_code, cfg.model.revision)
    train_rows, val_rows, stats, replay_unique = _data(cfg, tokenizer, rows)
    if len(train_rows) < dist.world:
        raise UserError(f"data: {len(train_rows)} training rows cannot be shared by {dist.world} processes")

    precision, frozen_dtype = resolve_precision(t, cfg.adapter.method, device)
    fast = make_trainable(load_base(cfg, resolved, frozen_dtype), cfg, device, dist, frozen_dtype)
    try:
        run = _assemble(
            cfg, out, ignore, device, dist, tokenizer, train_rows, val_rows, stats, precision, frozen_dtype, fast
        )
        if resume_from is not None:
            _resume(run, resume_from)
        if replay_unique:  # data.replay_loss: kl — the base model's targets, before any step moves it
            began = time.perf_counter()
            loss_module = getattr(run.trainer, "module", run.trainer)
            loss_module.soft = replay_kl.targets(run, replay_unique, resume_from)
            if dist.main:
                print(
                    f"tunesmith: replay: KL targets of the base model at {len(loss_module.soft[0]):,} answer tokens "
                    f"of {len(replay_unique)} replay samples ({time.perf_counter() - began:.1f} s)",
                    flush=True,
                )
        if not same_on_all_ranks(run.step, dist, device):  # every rank reads the checkpoint itself
            raise UserError(
                f"config key train.output_dir: the processes found different checkpoints in {out.path}; "
                "with several machines it must be on a filesystem they all share"
            )
        if dist.main:
            out.save_config(cfg)
        barrier(dist)
    except BaseException:
        fast.restore()
        raise
    if dist.main:
        warn_if_busy(threads, "train.threads")
        n_replay = getattr(stats, "n_replay", 0)
        replayed = f" + {n_replay} replay samples (data.replay)" if n_replay else ""
        print(
            f"tunesmith: {cfg.adapter.method} on {cfg.model.name}: {run.trainable:,} of {run.total_params:,} "
            f"parameters trainable; {stats.n_examples} examples ({stats.n_truncated} truncated, {stats.n_dropped} "
            f"dropped){replayed} → {len(train_rows)} rows of ≤{cfg.data.max_length} tokens; {run.total_steps} steps; "
            f"{precision} compute" + (f"; resuming at step {run.step}" if run.resumed else ""),
            flush=True,
        )
        if stats.context:
            print(
                context_line(stats.context, cfg.data.documents or cfg.compare.documents, cfg.data.max_length),
                flush=True,
            )
    return run


def _data(cfg: Config, tokenizer, rows):
    if rows is not None:
        return (*rows(tokenizer), [])
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else tunesmith_home() / "data-cache"
    train_samples, val_samples, stats = build_datasets(cfg.data, tokenizer, cfg.train.seed, cache_dir, cfg.compare)
    unique = []
    if cfg.data.replay_loss == "kl":
        train_samples, unique = replay_kl.mark(train_samples, stats.n_replay)
    pad_id, d = tokenizer.pad_token_id, cfg.data
    train_rows = make_rows(train_samples, d.packing, d.max_length, pad_id)
    val_rows = make_rows(val_samples, d.packing, d.max_length, pad_id) if val_samples else []
    return train_rows, val_rows, stats, unique


def _assemble(
    cfg, out, ignore, device, dist, tokenizer, train_rows, val_rows, stats, precision, frozen_dtype, fast
) -> Run:
    t, model, pad_id = cfg.train, fast.model, tokenizer.pad_token_id
    if fast.flat:
        multiple = gemm_rows_multiple(torch_dtype(precision), device)
        make_batch = functools.partial(flatten, multiple=multiple, pad_id=pad_id)
    else:
        make_batch = functools.partial(collate, pad_id=pad_id)
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
        lr=t.lr,
        betas=tuple(t.betas),
        fused=fused or None,
    )
    stream = RowStream(len(train_rows), t.batch_size, t.seed, dist)
    global_batch = t.batch_size * t.grad_accum * dist.world
    steps_per_epoch = max(1, math.ceil(stream.rows_per_epoch() / global_batch))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, t.lr_schedule, t.min_lr_ratio)
    )
    amp_dtype = None if precision == "fp32" else torch_dtype(precision)
    return Run(
        cfg=cfg,
        out=out,
        ignore=ignore,
        device=device,
        dist=dist,
        tokenizer=tokenizer,
        train_rows=train_rows,
        val_rows=val_rows,
        stats=stats,
        precision=precision,
        frozen_dtype=frozen_dtype,
        fast=fast,
        trainer=trainer,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        make_batch=make_batch,
        autocast=(lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext,
        scaler=torch.amp.GradScaler("cuda") if t.precision == "fp16" else None,
        total_steps=total_steps,
        global_batch=global_batch,
        # FSDP's forwards all-gather layer by layer, so every rank must run as many: one per micro-batch
        forward_tokens=0 if dist.enabled and dist.strategy == "fsdp" else forward_budget(cfg),
        trainable=trainable,
        total_params=total_params,
        guard=Guard(t, getattr(model.config, "vocab_size", None) or len(tokenizer), t.precision == "fp16"),
    )


def _resume(run: Run, checkpoint: Path) -> None:
    state = ckpt.load_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.global_batch)
    run.step, run.tokens_seen, run.last_loss = state["step"], state["tokens_seen"], state.get("last_loss")
    run.elapsed_before, run.resumed = state.get("elapsed_s", 0.0), True
    run.guard.skipped = state.get("skipped_steps", 0)
    t = run.cfg.train
    run.stream = RowStream(len(run.train_rows), t.batch_size, t.seed, run.dist, state["epoch"], state["offset"])


# ---------------------------------------------------------------- steps


def one_step(run: Run) -> tuple[float, int, float]:
    """One optimizer step over the next micro-batches: (mean loss, real tokens, seconds)."""
    t, dist, device = run.cfg.train, run.dist, run.device
    inject_fault(dist, run.step + 1)
    micro = [[run.train_rows[i] for i in ids] for ids in run.stream.next_step(t.grad_accum)]
    batches = [run.make_batch(group) for rows in micro for group in split_rows(rows, run.forward_tokens)]
    start = time.perf_counter()
    loss_total, global_tokens = accumulate_gradients(run.trainer, batches, dist, device, run.autocast, run.scaler)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    run.grad_norm = clip_grad_norm(run.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    run.last_loss = all_reduce_sum(loss_total, dist, device) / max(global_tokens, 1)
    verdict = run.guard.check(run.step + 1, run.last_loss, run.grad_norm, dist, device)
    if verdict == "ok" and run.scaler:
        run.scaler.step(run.optimizer)
    elif verdict == "ok":
        run.optimizer.step()
    if run.scaler:
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.step += 1
    # real tokens: padding is not work done
    step_tokens = int(all_reduce_sum(sum(r.n_real for rows in micro for r in rows), dist, device))
    run.tokens_seen += step_tokens
    return run.last_loss, step_tokens, time.perf_counter() - start


def train_steps(run: Run) -> float | None:
    """Steps until `total_steps`, logging, validating and checkpointing; the final validation loss."""
    t, dist = run.cfg.train, run.dist
    trackers = open_trackers(run.cfg, run.out.path, run.step) if dist.main else []
    records = run.records = Records(run.out.path, trackers, run.step) if dist.main else None
    bar = None
    if dist.main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
    run.started = time.perf_counter()
    clock = SaveClock(t.save_every_minutes, dist, run.device)  # rank 0's clock decides for all ranks
    while run.step < run.total_steps:
        loss, tokens, seconds = one_step(run)
        if dist.main:
            if run.step % t.log_every == 0 or run.step == run.total_steps:
                records.log(
                    {
                        "step": run.step,
                        "epoch": run.stream.position(),
                        "loss": round(loss, 6),
                        "lr": run.lr,
                        "grad_norm": round(run.grad_norm, 6),
                        "tokens": tokens,
                        "step_s": round(seconds, 4),
                        "tok_per_s": round(tokens / seconds, 1),
                        "elapsed_s": round(run.elapsed(), 3),
                        **({"update": run.guard.last} if run.guard.last != "ok" else {}),
                    }
                )
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
        if run.guard.last == "stop":
            if bar is not None:
                bar.close()
            stop_run(run)  # raises Diverged
        if t.eval_every and run.step % t.eval_every == 0 and run.step < run.total_steps and run.val_rows:
            _validate(run)
        saved = None
        if (t.save_every and run.step % t.save_every == 0) or run.step == run.total_steps or clock.due():
            saved = clock.saved(_save_checkpoint(run))
        if run.stop and run.stop.requested is not None:  # SIGINT/SIGTERM: a checkpoint at this step boundary, then out
            _stop(run, saved, bar)
    if bar is not None:
        bar.close()
    return _validate(run) if run.val_rows else None


def _stop(run: Run, saved: Path | None, bar) -> None:
    if bar is not None:
        bar.close()
    path = saved or _save_checkpoint(run)
    if run.records is not None:
        run.records.close()
    raise TrainingInterrupted(run.stop.requested, run.step, path)


def _validate(run: Run) -> float | None:
    t = run.cfg.train
    val_loss = evaluate(run.trainer, run.val_rows, t.batch_size, run.make_batch, run.device, run.dist, run.autocast)
    if run.dist.main:
        run.records.log({"step": run.step, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(val_loss), 4)})
    return val_loss


def _save_checkpoint(run: Run) -> Path | None:
    state = {
        "epoch": run.stream.epoch,
        "offset": run.stream.offset,
        "tokens_seen": run.tokens_seen,
        "last_loss": run.last_loss,
        "elapsed_s": run.elapsed(),
        "config_hash": config_hash(run.cfg, run.ignore),
        "global_batch": run.global_batch,
        "world_size": run.dist.world,
        "healthy": run.guard.healthy,
        "skipped_steps": run.guard.skipped,
    }
    # every rank: under FSDP saving gathers the shards; only rank 0 writes
    path = ckpt.save_checkpoint(
        run.out.checkpoints,
        run.step,
        run.model,
        run.optimizer,
        run.scheduler,
        state,
        run.cfg.train.keep_last,
        run.dist.main,
    )
    barrier(run.dist)
    return path
