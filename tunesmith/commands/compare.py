"""`tunesmith compare [CONFIG] [key=value ...]` → `tunesmith.compare(cfg)` (training the run first when needed)."""

from __future__ import annotations

from tunesmith.commands import add_config_arguments, load_config_args

HELP = "fine-tuned vs prompt vs RAG vs fine-tuned+RAG on your questions: table, results.json, report.html"


def add_arguments(p) -> None:
    add_config_arguments(p, "compare.arms=[base,rag]")


def run(args) -> int:
    from tunesmith import compare

    compare(load_config_args(args))
    return 0
