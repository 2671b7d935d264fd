"""Process groups, DDP / FSDP wrapping and failure handling, so one loop runs alone or under torchrun.

Contract:
- `setup(device, strategy, timeout_s)` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK,
  initialises the default process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)
  with `timeout_s` as the collective timeout, and returns a `Dist`. With one process
  everything here is a no-op and the strategy is ignored.
- `wrap(loss_module, dist)` returns what the loop calls forward/backward on: the module
  itself (one process), `DistributedDataParallel` (ddp: every rank holds the whole model) or
  the module sharded in place with FSDP2 `fully_shard` (fsdp: each decoder layer and the
  root are sharded over ranks; parameters become DTensors). Call it before building the
  optimizer: FSDP replaces the parameters.
- `no_sync(trainer, dist, last)`: skip the gradient all-reduce / reduce-scatter on all but
  the last micro-batch of a step (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`).
- `full_tensor(t)`: a DTensor gathered to a whole CPU tensor (a collective: every rank must
  call it, in the same order); plain tensors pass through. `full_state_dict(module)` does
  that for a whole state dict, keeping tied weights tied.
- `clip_grad_norm(params, max_norm)` returns the global norm as a float for both strategies.
- `same_on_all_ranks(value)`: whether every rank agrees (e.g. on the step it resumes from);
  `all_reduce_max(value)`: the largest value any rank holds (e.g. a verdict every rank follows).
- Failures: a peer that dies or stops answering makes the next collective on the others
  fail within `timeout_s`; `failure_line(err)` turns that into the one line the CLI prints,
  and torchrun's SIGTERM to the survivors raises `PeerFailure` for the same line.
- Test hook (documented in docs/errors.md): `TUNESMITH_TEST_FAULT=RANK:STEP:exit|hang` makes
  that rank die (SIGKILL itself) or hang (sleep forever) just before optimizer step STEP.
"""

from __future__ import annotations

import os
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

FAULT_ENV = "TUNESMITH_TEST_FAULT"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    timeout_s: float = 600.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


class PeerFailure(RuntimeError):
    """torchrun stopped this process because another one failed."""


def _on_sigterm(signum, frame):
    raise PeerFailure("stopped by torchrun because another process failed")


def setup(device: torch.device, strategy: str = "ddp", timeout_s: float = 600.0) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(strategy=strategy, timeout_s=timeout_s)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    # torchrun SIGTERMs the survivors when a worker fails; say so instead of vanishing.
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Dist(rank=rank, world=world, local_rank=local_rank, strategy=strategy, timeout_s=timeout_s)


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks transformers itself refuses to split across devices."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in names]


def wrap(loss_module: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    if not dist.enabled:
        return loss_module
    if dist.strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(loss_module)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(loss_module.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world,))
    for layer in _decoder_layers(loss_module.model):
        fully_shard(layer, mesh=mesh)
    # The root holds embeddings, final norm and head (tied weights stay in one group); the
    # loss module is the root so its forward, not model.forward, gathers them.
    fully_shard(loss_module, mesh=mesh)
    return loss_module


def no_sync(trainer, dist: Dist, last: bool):
    if not dist.enabled or last:
        return nullcontext()
    if hasattr(trainer, "no_sync"):
        return trainer.no_sync()
    return _fsdp_no_sync(trainer)


@contextmanager
def _fsdp_no_sync(trainer):
    trainer.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        trainer.set_requires_gradient_sync(True)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state_dict(module) -> dict[str, torch.Tensor]:
    out, seen = {}, {}
    for name, value in module.state_dict(keep_vars=True).items():  # the Parameters: tied ones are one object
        key = id(value)
        if key not in seen:  # tied weights appear under two names; gather (and save) once
            seen[key] = full_tensor(value)
        out[name] = seen[key]
    return out


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, laid out as the DTensor `like` (every rank holds `full`)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def clip_grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if is_sharded(norm) else norm)


def all_reduce_sum(value: float | int, dist: Dist, device: torch.device) -> float:
    if not dist.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.item()


def all_reduce_max(value: float | int, dist: Dist, device: torch.device) -> float:
    if not dist.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t.item()


def same_on_all_ranks(value: int, dist: Dist, device: torch.device) -> bool:
    """True on every rank when all ranks hold the same `value` (one max-reduction of ±value)."""
    if not dist.enabled:
        return True
    t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t[0].item() == value and -t[1].item() == value


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def cleanup(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        # Tear down together: rank 0 saves and plots after the last collective while the others
        # reach this point at once, and a gloo group destroyed with a peer still busy was seen to
        # leave a rank hanging at exit.
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def failure_line(err: BaseException, timeout_s: float | None = None) -> str | None:
    """One line for a collective that failed because a peer died or hung; None otherwise."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return None
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    if isinstance(err, PeerFailure):
        return f"rank {rank} of {world}: {err}"
    text = str(err)
    markers = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe", "NCCL", "gloo")
    if not isinstance(err, (torch_dist.DistError, RuntimeError)) or not any(m in text for m in markers):
        return None
    hung = "imed out" in text
    why = "stopped answering" + (f" for train.dist_timeout_s={timeout_s:g}" if timeout_s else "") if hung else "died"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)  # gloo's source location
    first = first.split(". ")[0][:120]
    return f"rank {rank} of {world}: another process {why}; the run is stopped ({first})"


def inject_fault(dist: Dist, step: int) -> None:
    """The documented test hook; a no-op unless TUNESMITH_TEST_FAULT names this rank and step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, at, kind = spec.split(":")
    if int(rank) != dist.rank or int(at) != step:
        return
    if kind == "exit":
        os.kill(os.getpid(), signal.SIGKILL)
    while kind == "hang":
        time.sleep(3600)
