"""Atomic checkpoints that resume a run exactly.

Contract:
- `save_checkpoint(root, step, model, optimizer, scheduler, state, keep_last)` writes
  `root/step-NNNNNNNN/` holding the trainable weights (`trainable.safetensors`), optimizer and
  scheduler state (`optimizer.pt`, tensors and plain values only), RNG states
  (`rng.safetensors`) and `state.json` (step, data position, anything in `state`). It writes
  into a temporary sibling, fsyncs every file and the directory, then renames: a kill at
  any moment leaves either the previous checkpoints or the complete new one, never half.
  Only the newest `keep_last` checkpoints are kept.
- `latest_checkpoint(root)` finds the newest complete checkpoint (temp dirs are ignored).
- `load_checkpoint(path, model, optimizer, scheduler)` restores all of it and returns the
  `state.json` dict. Optimizer state is read with `torch.load(weights_only=True)`: no pickle
  code can run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng_tensors, rng_plain = rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_plain}), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():  # a rerun of the same step after resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return max(complete, default=None)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    try:
        weights = load_file(path / "trainable.safetensors")
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = load_file(path / "rng.safetensors")
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: not a readable tunesmith checkpoint ({str(err).splitlines()[0]})") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise UserError(f"{path}: checkpoint weights do not match this model/adapter (different method or targets?)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(rng, state["rng"])
    return state
