"""`tunesmith train [CONFIG] [key=value ...] [--resume] [--force]` → `tunesmith.finetune(cfg)`.

Before training, cheapest first: an output dir nothing can be written to (exit 1), the data
check (`data.lint`: a bad file is exit 2, findings a few warning lines), the device, then the fit
check (`train.fit_report.preflight`, memory probe without timing; refuses with exit 2 and the
overrides that would fit, unless --force). Under torchrun only rank 0 prints them; a dead or hung
peer, a full disk or a read-only path during the run is one line and exit 1.
"""

from __future__ import annotations

import os
import sys

from tunesmith.commands import add_config_arguments, load_config_args
from tunesmith.errors import EnvironmentFault

HELP = "fine-tune a model: tunesmith train CONFIG [key=value ...]"
FLAGS = {"ram_gib": "TUNESMITH_RAM_GIB"}


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--force", action="store_true", help="train even when the fit check predicts it will not fit")


def run(args) -> int:
    cfg = load_config_args(args, ["train.resume=auto"] if args.resume else [])
    from tunesmith.train.signals import say_fresh_start, sigterm_interrupts

    sigterm_interrupts()
    main = os.environ.get("RANK", "0") == "0"
    from tunesmith.train.budget import GIB, limit_heap_retention, return_freed_heap, unwritable

    problem = unwritable(cfg.train.output_dir)
    if problem:  # the machine, not the input: exit 1 (docs/errors.md)
        raise EnvironmentFault(f"config key train.output_dir: {problem}; nothing was written")
    if main:  # the data first: a bad file is one line before any model is read
        from tunesmith.data.lint import train_warnings

        for line in train_warnings(cfg.data):
            print(f"tunesmith: data: {line}", flush=True)
    from tunesmith.models import pick_device

    pick_device(cfg.train.device)  # one this machine lacks (mps, cuda:3) is one line before any work
    limit_heap_retention()  # freed activations go back to the OS: ~40% lower peak RSS (see there)
    from tunesmith.infer.replay import prepare_replay

    prepare_replay(cfg, quiet=not main)  # data.replay_source=self: the base model's answers, before the fit check
    if not args.force:
        from tunesmith.train.fit_report import preflight
        from tunesmith.train.kernels.scratch import release

        est = preflight(cfg)
        release()  # the probes' buffers and freed heap: the run grows its own
        return_freed_heap()
        if main:
            print(
                f"tunesmith: fit: predicted peak RAM {est.peak_bytes * est.processes / GIB:.2f} of "
                f"{est.ram_budget / GIB:.2f} GiB, disk {est.disk_bytes / GIB:.2f} of "
                f"{est.disk_free / GIB:.2f} GiB (tunesmith fit for details; --force skips)",
                flush=True,
            )
    if args.resume:
        say_fresh_start(cfg)
    from tunesmith import finetune

    try:
        finetune(cfg)
    except Exception as err:  # under torchrun: a dead or hung peer becomes one line, exit 1
        from tunesmith.errors import environment_fault
        from tunesmith.train.distributed import failure_line

        line = environment_fault(err, cfg.train.output_dir) or failure_line(err, cfg.train.dist_timeout_s)
        if line is None:
            raise
        print(f"tunesmith: error: {line}; newest complete checkpoint: {_newest(cfg)}", file=sys.stderr, flush=True)
        return 1
    return 0


def interrupted(args, words: list[str], err: KeyboardInterrupt) -> str:
    """The line for Ctrl-C/SIGTERM: the checkpoint just saved (or the newest one) and how to resume."""
    import signal

    from tunesmith.rundir import RunDir
    from tunesmith.train.signals import TrainingInterrupted, interrupt_line, resume_command

    signum = err.signum if isinstance(err, TrainingInterrupted) else signal.SIGINT
    checkpoint = getattr(err, "checkpoint", None)
    saved_now = checkpoint is not None
    if checkpoint is None:
        try:
            checkpoint = RunDir(load_config_args(args).train.output_dir).latest_checkpoint()
        except Exception:  # the config itself was the problem: nothing was trained
            checkpoint = None
    return interrupt_line(signal.Signals(signum).name, checkpoint, resume_command(args.verb, words), saved_now)


def _newest(cfg) -> str:
    from tunesmith.rundir import RunDir

    found = RunDir(cfg.train.output_dir).latest_checkpoint()
    return f"{found} (continue with train.resume=auto)" if found else "none"
