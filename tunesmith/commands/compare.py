"""`tunesmith compare [CONFIG] [key=value ...]` → `tunesmith.eval.compare.run_compare(cfg)`."""

from tunesmith.config import load_config


def run(args) -> int:
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    cfg = load_config(config, overrides)
    from tunesmith.eval.compare import run_compare

    run_compare(cfg)
    return 0
