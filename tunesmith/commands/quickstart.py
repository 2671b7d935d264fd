"""`tunesmith quickstart [--out DIR] [--no-compare] [key=value ...]` → `workflows.quickstart.run_quickstart`."""

from __future__ import annotations

HELP = "LoRA-tune SmolLM2 on the bundled dataset; before/after"


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/quickstart-demo", help="output dir of the LoRA run")
    p.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the closing fine-tuned vs prompt vs RAG comparison",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/quickstart.yaml")


def run(args) -> int:
    from tunesmith.workflows.quickstart import run_quickstart

    run_quickstart(args.out, list(args.overrides), compare=args.compare)
    return 0
