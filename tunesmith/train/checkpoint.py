"""Atomic checkpoints that resume a run exactly.

Contract:
- `save_checkpoint(root, step, model, optimizer, scheduler, state, keep_last, write)` writes
  `root/step-NNNNNNNN/` holding the trainable weights (`trainable.safetensors`), optimizer and
  scheduler state (`optimizer.pt`, tensors and plain values only), RNG states
  (`rng.safetensors`), `state.json` (step, data position, anything in `state`, and "healthy":
  `state["healthy"]` and every weight finite) and `manifest.json` (each file's size and
  SHA-256). It writes into a temporary sibling (removed again if writing fails, e.g. disk
  full), fsyncs every file and the directory, then renames; a step saved again (after a resume
  from an older checkpoint) is swapped in with `io.replace_dir`: a kill at any moment leaves
  either the previous checkpoints or the complete new one, never half. The newest `keep_last`
  checkpoints are kept, and the newest healthy one besides: pruning never removes the last good
  one.
- Under FSDP every rank must call `save_checkpoint` (weights and optimizer state are gathered
  from the shards, a collective); only the rank with `write=True` writes. The files are the
  same whether the run had one process, DDP or FSDP, so any of them resumes any other, with
  any number of processes, as long as the global batch (rows per optimizer step) is the same.
- `latest_checkpoint(root)` (from `rundir`) finds the newest complete, healthy checkpoint (temp dirs
  are ignored; a file missing or unlike its manifest makes a checkpoint incomplete).
- `load_checkpoint(path, model, optimizer, scheduler)` restores all of it and returns the
  `state.json` dict. Optimizer state is read with `torch.load(weights_only=True)`: no pickle
  code can run. Sharded (DTensor) parameters and their optimizer state get this rank's piece
  of the saved whole tensors. With `global_batch`, a checkpoint saved with another global
  batch is refused (a `UserError`) before anything is changed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunesmith.errors import UserError
from tunesmith.io import replace_dir, write_manifest
from tunesmith.rundir import STEP_DIR, checkpoint_healthy, latest_checkpoint
from tunesmith.train.distributed import full_tensor, is_sharded, local_shard

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with sharded state gathered whole: the single-process format."""
    sd = optimizer.state_dict()
    state = {}
    for pid in sorted(sd["state"]):  # same order on every rank: the gathers are collectives
        state[pid] = {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in sorted(sd["state"][pid].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def _reshard_optimizer(optimizer) -> None:
    """After loading whole tensors: give each DTensor parameter's state its local piece."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    optimizer.state[p][k] = local_shard(v, p)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    root: Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int, write: bool = True
) -> Path | None:
    sharded = any(is_sharded(p) for p in model.parameters())
    if not write and not sharded:
        return None
    weights, opt_state = trainable_state(model), optimizer_state(optimizer)
    if not write:
        return None
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    healthy = bool(state.get("healthy", True)) and all(bool(torch.isfinite(t).all()) for t in weights.values())
    try:
        tmp.mkdir()
        save_file(weights, tmp / "trainable.safetensors")
        torch.save({"optimizer": opt_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        rng_tensors, rng_plain = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        record = {**state, "step": step, "healthy": healthy, "rng": rng_plain}
        (tmp / "state.json").write_text(json.dumps(record), encoding="utf-8")
        write_manifest(tmp)
        replace_dir(tmp, final)  # fsyncs; a step saved again is swapped in whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full, Ctrl-C) leaves nothing behind
        raise
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    """The newest `keep_last`, and the newest healthy one even when it is older."""
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    kept = steps[-keep_last:]
    if not any(checkpoint_healthy(p) for p in kept):
        kept += [p for p in steps if checkpoint_healthy(p)][-1:]
    for old in steps:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, global_batch: int | None = None) -> dict:
    current = path / "trainable.safetensors"
    try:
        weights = load_file(current)
        current = path / "optimizer.pt"
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            opt = torch.load(current, map_location="cpu", weights_only=True)
        current = path / "rng.safetensors"
        rng = load_file(current)
        current = path / "state.json"
        state = json.loads(current.read_text(encoding="utf-8"))
    except pickle.UnpicklingError:  # torch's message is 25 lines of advice to unpickle it anyway
        raise UserError(f"{current}: holds pickled objects other than tensors; refused unread") from None
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{current}: not a readable tunesmith checkpoint file ({first})") from None
    saved_batch = state.get("global_batch")
    if global_batch is not None and saved_batch is not None and saved_batch != global_batch:
        raise UserError(
            f"{path}: saved with a global batch of {saved_batch} rows per step ({state.get('world_size', 1)} "
            f"process(es)), this run has {global_batch}; set train.batch_size × train.grad_accum × processes "
            f"= {saved_batch} to resume"
        )
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise UserError(f"{path}: checkpoint weights do not match this model/adapter (different method or targets?)")
    with torch.no_grad():
        for name, tensor in weights.items():
            p = params[name]
            if is_sharded(p):
                p.to_local().copy_(local_shard(tensor, p).to_local())
            else:
                p.copy_(tensor)
    optimizer.load_state_dict(opt["optimizer"])
    _reshard_optimizer(optimizer)
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(rng, state["rng"])
    return state
