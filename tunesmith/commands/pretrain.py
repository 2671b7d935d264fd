"""`tunesmith pretrain [CONFIG] [key=value ...] [--resume]` → `pretrain.run.run_pretrain(cfg)`."""

from __future__ import annotations

from tunesmith.commands import add_config_arguments, load_config_args
from tunesmith.commands.train import interrupted  # noqa: F401  (the cli's Ctrl-C/SIGTERM line)

HELP = "pre-train on raw text: from scratch (tokenizer + model preset) or continued"


def add_arguments(p) -> None:
    add_config_arguments(p, "pretrain.max_steps=200")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")


def run(args) -> int:
    from tunesmith.pretrain.run import run_pretrain
    from tunesmith.train.signals import say_fresh_start, sigterm_interrupts

    sigterm_interrupts()
    cfg = load_config_args(args, ["train.resume=auto"] if args.resume else [])
    if args.resume:
        say_fresh_start(cfg)
    run_pretrain(cfg)
    return 0
