"""CLI verbs: one module per verb, each a thin wrapper over a library function.

Every verb module has `HELP` (its one line in `tunesmith --help`), `add_arguments(parser)` (its
own arguments), `run(args)` (returns the exit code) and, where the library names an argument
differently from the flag, `FLAGS` (library name → flag) for the error line. The verbs that take a
config share `add_config_arguments` and `load_config_args`: `VERB [CONFIG.yaml] [key.sub=value ...]`.
"""

from __future__ import annotations

from tunesmith.config import Config, load_config


def add_config_arguments(p, example: str = "train.max_steps=60") -> None:
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
    p.epilog = "every key with its default and help: tunesmith config keys; the resolved config: tunesmith config show"


def load_config_args(args, extra: list[str] = ()) -> Config:
    """The config `CONFIG key=value ...` describes; without a file the first word is an override."""
    overrides, config = list(args.overrides), args.config
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return load_config(config, overrides + list(extra))
