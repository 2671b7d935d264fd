"""`tunesmith quickstart [--out DIR] [--no-compare] [key=value ...]` → `tunesmith.quickstart.run_quickstart`."""


def run(args) -> int:
    from tunesmith.quickstart import run_quickstart

    run_quickstart(args.out, list(args.overrides), compare=args.compare)
    return 0
