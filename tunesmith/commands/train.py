"""`tunesmith train CONFIG [key=value ...] [--resume]` → `tunesmith.train(cfg)`."""

from tunesmith.config import load_config


def run(args) -> int:
    overrides = list(args.overrides)
    config = args.config
    # `tunesmith train key=value ...` without a file: the first word is an override.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    if args.resume:
        overrides.append("train.resume=auto")
    cfg = load_config(config, overrides)
    from tunesmith.train.loop import run_training

    run_training(cfg)
    return 0
