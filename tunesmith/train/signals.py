"""Checkpoints when they are needed: on SIGINT/SIGTERM at the next step boundary, and every few minutes.

Contract:
- `StopSignals()` is a context manager the training loop holds around its steps (one process
  only; under torchrun it does nothing: torchrun's own SIGTERM means "a peer failed", and a
  checkpoint then would wait on a dead peer — see docs/distributed.md). The first SIGINT or
  SIGTERM is only noted (`requested` = the signal number) and the previous handlers come back,
  so a second Ctrl-C interrupts at once (`KeyboardInterrupt`) and a second SIGTERM kills.
  Leaving the block restores the handlers too.
- `SaveClock(minutes)` says when a time-based checkpoint is due (`due()`), counted from the
  start or the last `saved()`; 0 minutes never. Under torchrun the loop asks rank 0's clock
  and shares the answer, so every rank saves at the same step.
- `say_fresh_start(cfg)`: what `--resume` prints when there is nothing to resume from.
- `TrainingInterrupted(signum, step, checkpoint)` is what the loop raises after saving on a
  signal (a `KeyboardInterrupt`); `exit_code` is 128 + signum (130 for SIGINT, 143 for SIGTERM).
  The command turns it into one line with the exact `--resume` command (`interrupt_line`).
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from pathlib import Path

from tunesmith.train.distributed import Dist, all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt, so code that cleans up after Ctrl-C does so after SIGTERM too."""

    def __init__(self, signum: int, step: int | None, checkpoint: Path | None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def sigterm_interrupts() -> None:
    """Until a training loop takes over: SIGTERM stops like Ctrl-C (a line and exit 143, not a silent death)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


def _raise(signum, frame):
    raise TrainingInterrupted(signum, None, None)


class StopSignals:
    """Notes the first SIGINT/SIGTERM instead of dying; see the module contract."""

    def __init__(self, enabled: bool = True):
        # signal handlers can only be set from the main thread (the API may run elsewhere)
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.requested = signum
        self._restore()  # the second one acts at once

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class SaveClock:
    def __init__(self, minutes: float, dist: Dist | None = None, device=None):
        self.seconds, self.dist, self.device = minutes * 60.0, dist, device
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.seconds <= 0:
            return False
        mine = time.monotonic() - self.last >= self.seconds
        if self.dist is None or not self.dist.enabled:
            return mine
        return all_reduce_sum(float(self.dist.main and mine), self.dist, self.device) > 0  # a collective

    def saved(self, checkpoint: Path | None) -> Path | None:
        self.last = time.monotonic()
        return checkpoint


def say_fresh_start(cfg) -> None:
    """`--resume` with no checkpoint in the output dir: say the run starts from step 0 (rank 0)."""
    from tunesmith.rundir import RunDir

    out = RunDir(cfg.train.output_dir)
    if os.environ.get("RANK", "0") == "0" and out.latest_checkpoint() is None:
        print(f"tunesmith: nothing to resume in {out.path} (no checkpoint); starting fresh at step 0", flush=True)


def resume_command(verb: str, argv: list[str]) -> str:
    """The command line that continues this run: the same words plus `--resume`."""
    words = ["tunesmith", verb, *argv]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)


def interrupt_line(signame: str, checkpoint: Path | None, resume: str, saved_now: bool) -> str:
    """One line for a run stopped by a signal: what is on disk and the command that continues it."""
    if checkpoint is None:
        return f"tunesmith: interrupted ({signame}); no checkpoint exists, so running it again starts from step 0"
    what = "checkpoint saved" if saved_now else "no new checkpoint; the newest is"
    return f"tunesmith: interrupted ({signame}); {what} at step {_step_of(checkpoint)} ({checkpoint}); resume: {resume}"


def _step_of(checkpoint: Path) -> int | str:
    try:
        return int(checkpoint.name.split("-")[1])
    except (IndexError, ValueError):
        return "?"
