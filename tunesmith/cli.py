"""The `tunesmith` command: one table of verbs, each a module of `tunesmith.commands`.

Contract: `main(argv)` parses `tunesmith VERB ...`, runs the verb's `run(args)` and returns its
exit code. A `UserError` (or a bad flag) prints one line on stderr — in the verb's flag names
(`commands.<verb>.FLAGS`) — and exits with 2, no traceback; an environment fault (disk full,
read-only path: `errors.environment_fault`) is one line and exit 1; Ctrl-C exits with 130 (SIGTERM in
training: 143) with one line, from the verb's `interrupted(args, words, err)` where it has one; `export`
returns 3 when the GGUF fails verification, and a training run that diverged (`errors.Diverged`: one
line) 3; no verb prints a two-line usage, exit 2. Verb modules
import their heavy libraries (torch, transformers) only when they run.
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
        "serve",
        "config",
    )
}
USAGE = (
    "usage: tunesmith VERB [ARGS]   (tunesmith --help: what each verb does; tunesmith VERB --help: its flags)\n"
    f"verbs: {', '.join(COMMANDS)}\n"
)
# what an environment fault leaves: every writer renames finished files into place (tunesmith.io)
KEPT = "files finished before it are kept whole; nothing half-written replaced them"


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; users get one line and exit code 2 instead."""

    def error(self, message):
        self.exit(2, f"tunesmith: error: {message} (see {self.prog} --help)\n")


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
    bury our one-line errors and progress, so only its errors get through. Said through the
    environment transformers reads when it is imported, so a verb that fails in validation does not
    pay the 1.5 s import."""
    import os

    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # already imported (the API used in-process): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    import warnings

    # library deprecation notices (e.g. transformers' is_gradient_checkpointing rename, hit by
    # peft) say nothing a tunesmith user can act on
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(USAGE, end="", file=sys.stderr)
        return 2
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"tunesmith: error: unknown verb {argv[0]!r}; {hint}(see tunesmith --help)", file=sys.stderr)
        raise SystemExit(2)  # as argparse's own errors
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after a flag (`train c.yaml --resume train.lr=1e-4`) belong to them
        if not hasattr(args, "overrides") or any(w.startswith("-") or "=" not in w for w in extra):
            where = f"tunesmith {args.verb}" if args.verb else "tunesmith"
            print(f"tunesmith: error: unrecognized arguments: {' '.join(extra)} (see {where} --help)", file=sys.stderr)
            raise SystemExit(2)
        args.overrides += extra
    if not args.verb:
        print(USAGE, end="", file=sys.stderr)
        return 2
    from tunesmith.errors import Diverged, EnvironmentFault, UserError, environment_fault

    _quiet_libraries()
    module = importlib.import_module(COMMANDS[args.verb])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"tunesmith: error: {err.speaking(getattr(module, 'FLAGS', {}))}", file=sys.stderr)
        return 1 if isinstance(err, EnvironmentFault) else 2
    except OSError as err:
        line = environment_fault(err)
        if line is None:
            raise
        print(f"tunesmith: error: {line}; {KEPT}", file=sys.stderr)
        return 1
    except Diverged as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGINT noted by a training loop (exit 128 + signal)
        say = getattr(module, "interrupted", None)
        words = argv[argv.index(args.verb) + 1 :] if args.verb in argv else []
        line = "tunesmith: interrupted"
        if getattr(err, "checkpoint", None) is not None:  # compare, quickstart, pipeline: they resume on a rerun
            line += f"; checkpoint saved ({err.checkpoint}); the same command again continues from it"
        print(say(args, words, err) if say else line, file=sys.stderr, flush=True)
        return int(getattr(err, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())
