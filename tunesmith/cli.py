"""The `tunesmith` command: one table of verbs, each a module of `tunesmith.commands`.

Contract: `main(argv)` parses `tunesmith VERB ...`, runs the verb's `run(args)` and returns its
exit code. A `UserError` (or a bad flag) prints one line on stderr — in the verb's flag names
(`commands.<verb>.FLAGS`) — and exits with 2, no traceback; Ctrl-C exits with 130; `export`
returns 3 when the GGUF fails verification, and a training run that diverged (`errors.Diverged`:
one line) 3. Verb modules import their heavy libraries (torch, transformers) only when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb → the module that declares its arguments and runs it
COMMANDS: dict[str, str] = {
    verb: f"tunesmith.commands.{verb}"
    for verb in (
        "train",
        "generate",
        "chat",
        "quickstart",
        "merge",
        "export",
        "quantize",
        "fit",
        "data",
        "pretrain",
        "pipeline",
        "compare",
    )
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; users get one line and exit code 2 instead."""

    def error(self, message):
        self.exit(2, f"tunesmith: error: {message} (see tunesmith {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from tunesmith import __version__

    parser = OneLineParser(prog="tunesmith", description="Fine-tune, quantize and measure causal LLMs on CPU.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
    for verb, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(verb, help=module.HELP, description=module.HELP))
    return parser


def _quiet_libraries() -> None:
    """The CLI speaks for itself: transformers' per-load progress bars and advice would
    bury our one-line errors and progress, so only its errors get through."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    # library deprecation notices (e.g. transformers' is_gradient_checkpointing rename, hit by
    # peft) say nothing a tunesmith user can act on
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    from tunesmith.errors import Diverged, UserError

    _quiet_libraries()
    module = importlib.import_module(COMMANDS[args.verb])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"tunesmith: error: {err.speaking(getattr(module, 'FLAGS', {}))}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
