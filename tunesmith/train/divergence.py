"""The divergence guard: stop (or skip) a step whose loss or gradient has gone bad.

Contract: `Guard(cfg.train, vocab_size)`; `guard.check(step, loss, grad_norm, dist, device)`
after the gradients of a step are summed and clipped, before the optimizer steps; it returns
  "ok"    the update is applied;
  "skip"  (`train.on_divergence: skip_step`) the update is dropped: no optimizer step (weights
          and Adam moments stay as they were), the gradients are cleared; the step still counts
          (the scheduler advances and the step's rows are consumed), so the step number, the lr
          schedule and the data position stay in step and a resume is exact;
  "stop"  the run ends: `guard.reason` says why; the loop calls `stop_run(run)`, which raises
          `Diverged` (exit 3) naming the step and the last good checkpoint.
A step diverges when its loss or its gradient norm is not finite (under fp16 loss scaling an
infinite gradient is the scaler's business: it skips that step and lowers the scale). It stops
the run at once with `stop`; with `skip_step` after `train.max_skipped_steps` dropped updates.
A collapse always stops: the loss within 1% of ln(vocab) (a uniform guess) *and* the gradient
norm below 1e-6 for 3 consecutive steps — the weights are already ruined, and dropping updates
that are zero anyway would change nothing. Every rank reaches the same verdict: the loss and norm
are already all-reduced, and the verdict is all-reduced once more (max) all the same.
`guard.healthy` is recorded in each checkpoint: the last step was applied and not part of a
collapse streak. `skipped` is saved in checkpoints and restored on resume.
"""

from __future__ import annotations

import math

from tunesmith.errors import Diverged
from tunesmith.train.distributed import all_reduce_max, cleanup

COLLAPSE_STEPS = 3  # consecutive steps
COLLAPSE_LOSS = 0.01  # |loss - ln V| below this fraction of ln V
COLLAPSE_GRAD = 1e-6  # gradient norm below this
VERDICTS = ("ok", "skip", "stop")


class Guard:
    def __init__(self, train_cfg, vocab_size: int, scaled: bool = False):
        self.policy, self.max_skipped = train_cfg.on_divergence, train_cfg.max_skipped_steps
        self.log_vocab = math.log(max(vocab_size, 2))
        self.scaled = scaled  # fp16 loss scaling: the GradScaler handles infinite gradients
        self.skipped = 0
        self.streak = 0
        self.last = "ok"
        self.reason = ""

    @property
    def healthy(self) -> bool:
        return self.last == "ok" and self.streak == 0

    def _problem(self, step: int, loss: float, grad_norm: float) -> tuple[str, str]:
        """(verdict before agreement, why) for this step alone."""
        if not math.isfinite(loss):
            return "bad", f"the loss is {loss}"
        if not math.isfinite(grad_norm) and not self.scaled:
            return "bad", f"the gradient norm is {grad_norm}"
        collapsed = abs(loss - self.log_vocab) < COLLAPSE_LOSS * self.log_vocab and grad_norm < COLLAPSE_GRAD
        self.streak = self.streak + 1 if collapsed else 0
        if self.streak >= COLLAPSE_STEPS:
            return "stop", (
                f"the loss has stayed at ln(vocab) = {self.log_vocab:.4f} with a gradient norm below "
                f"{COLLAPSE_GRAD:g} for {self.streak} steps (the model collapsed to a uniform guess)"
            )
        return "ok", ""

    def check(self, step: int, loss: float, grad_norm: float, dist, device) -> str:
        verdict, why = self._problem(step, loss, grad_norm)
        if verdict == "bad":
            if self.policy == "skip_step" and self.skipped < self.max_skipped:
                verdict = "skip"
            else:
                verdict = "stop"
                if self.policy == "skip_step":
                    why += f", and train.max_skipped_steps={self.max_skipped} updates were already dropped"
        agreed = VERDICTS[int(all_reduce_max(VERDICTS.index(verdict), dist, device))]
        if agreed == "skip":
            self.skipped += 1
        if agreed == "stop":
            self.reason = f"at step {step}: {why or 'another process saw its loss diverge'}"
        self.last = agreed
        return agreed


def stop_run(run) -> None:
    """A diverged run (`train.loop.Run`) ends here on every rank: nothing more is saved, the
    metrics are closed, and `Diverged` names the step and the last good checkpoint."""
    good = None
    if run.dist.main:
        run.records.close()
        good = run.out.latest_checkpoint()
    cleanup(run.dist)
    raise Diverged(stop_line(run.guard, good))


def stop_line(guard: Guard, good) -> str:
    """The one line a stopped run ends with (rank 0 knows `good`, the last good checkpoint)."""
    kept = f"the last good checkpoint is {good}" if good else "no good checkpoint was saved"
    return (
        f"training diverged {guard.reason} (train.on_divergence={guard.policy}); {kept}; "
        "lower train.lr (or raise train.warmup_steps) and start again"
    )
