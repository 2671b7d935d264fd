"""`tunesmith pipeline [CONFIG] [key=value ...] [--from STAGE]` → `workflows.pipeline.run_pipeline(cfg)`."""

from __future__ import annotations

from tunesmith.commands import add_config_arguments, load_config_args
from tunesmith.config import PIPELINE_STAGES

HELP = "pretrain → fine-tune → merge → export → compare from one config; resumable"
FLAGS = {"from_stage": "--from"}


def add_arguments(p) -> None:
    add_config_arguments(p, "pipeline.stages=[finetune,merge,export]")
    p.add_argument(
        "--from",
        dest="from_stage",
        choices=list(PIPELINE_STAGES),
        help="rerun from this stage (it and the later ones are cleared)",
    )


def run(args) -> int:
    from tunesmith.workflows.pipeline import run_pipeline

    run_pipeline(load_config_args(args), from_stage=args.from_stage)
    return 0
