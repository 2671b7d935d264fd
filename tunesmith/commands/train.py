"""`tunesmith train CONFIG [key=value ...] [--resume] [--force]` → `tunesmith.train(cfg)`.

Before training: the fit check (`tunesmith.fit.preflight`, memory probe without timing;
refuses with exit 2 and the overrides that would fit, unless --force) and the data check
(`tunesmith.data.lint`, a few warning lines). Under torchrun only rank 0 prints them.
"""

import os
import sys

from tunesmith.config import load_config


def config_from_args(args):
    overrides = list(args.overrides)
    config = args.config
    # `tunesmith train key=value ...` without a file: the first word is an override.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    if getattr(args, "resume", False):
        overrides.append("train.resume=auto")
    return load_config(config, overrides)


def run(args) -> int:
    cfg = config_from_args(args)
    main = os.environ.get("RANK", "0") == "0"
    from tunesmith.fit import limit_heap_retention

    limit_heap_retention()  # freed activations go back to the OS: ~40% lower peak RSS (see there)
    if not args.force:
        from tunesmith import fit

        est = fit.preflight(cfg)
        if main:
            print(
                f"tunesmith: fit: predicted peak RAM {est.peak_bytes * est.processes / fit.GIB:.2f} of "
                f"{est.ram_budget / fit.GIB:.2f} GiB, disk {est.disk_bytes / fit.GIB:.2f} of "
                f"{est.disk_free / fit.GIB:.2f} GiB (tunesmith fit for details; --force skips)",
                flush=True,
            )
    if main:
        from tunesmith.data.lint import train_warnings

        for line in train_warnings(cfg.data):
            print(f"tunesmith: data: {line}", flush=True)
    from tunesmith.train.loop import run_training

    try:
        run_training(cfg)
    except Exception as err:  # under torchrun: a dead or hung peer becomes one line, exit 1
        from tunesmith.train.distributed import failure_line

        line = failure_line(err, cfg.train.dist_timeout_s)
        if line is None:
            raise
        print(f"tunesmith: error: {line}; newest complete checkpoint: {_newest(cfg)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _newest(cfg) -> str:
    from pathlib import Path

    from tunesmith.train.checkpoint import latest_checkpoint

    found = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    return f"{found} (continue with train.resume=auto)" if found else "none"
