"""`tunesmith pretrain CONFIG [key=value ...] [--resume]` and `tunesmith pipeline CONFIG [key=value ...]
[--from STAGE]` → `tunesmith.pretrain.run.run_pretrain(cfg)` / `tunesmith.pipeline.run_pipeline(cfg)`."""


def _config(args, extra=()):
    from tunesmith.config import load_config

    overrides, config = list(args.overrides), args.config
    # `tunesmith pretrain key=value ...` without a file: the first word is an override.
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return load_config(config, overrides + list(extra))


def run(args) -> int:
    from tunesmith.pretrain.run import run_pretrain

    run_pretrain(_config(args, ["train.resume=auto"] if args.resume else []))
    return 0


def run_pipeline(args) -> int:
    from tunesmith.pipeline import run_pipeline as pipeline

    pipeline(_config(args), from_stage=args.from_stage)
    return 0
