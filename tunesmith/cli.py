"""The `tunesmith` command: one table of verbs, each imported only when it runs.

Contract: `main(argv)` parses `tunesmith VERB ...`, runs the verb's handler and returns its
exit code. A `UserError` (or a bad flag) prints one line on stderr and exits with 2, no
traceback; Ctrl-C exits with 130; `export` returns 3 when the GGUF fails verification. Handlers live in `tunesmith.commands.*` and are thin
wrappers over library functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb → (module:function, one-line help, argument builder)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tunesmith.commands.train:run", "fine-tune a model: tunesmith train CONFIG [key=value ...]"),
    "generate": ("tunesmith.commands.generate:run_generate", "answer one prompt or a file of prompts"),
    "chat": ("tunesmith.commands.generate:run_chat", "chat interactively with a model or run dir (streaming)"),
    "quickstart": ("tunesmith.commands.quickstart:run", "LoRA-tune SmolLM2 on the bundled dataset; before/after"),
    "merge": ("tunesmith.commands.export:run_merge", "fold a run's LoRA/DoRA adapter into its base; write an HF model dir"),
    "export": ("tunesmith.commands.export:run_export", "write a model or run as GGUF (f32/f16/q8_0/q4_0) + Ollama Modelfile"),
    "quantize": ("tunesmith.commands.export:run_quantize", "int8/int4 weight-only quantization for PyTorch CPU inference"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; users get one line and exit code 2 instead."""

    def error(self, message):
        self.exit(2, f"tunesmith: error: {message} (see tunesmith {self.prog.split()[-1]} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run dir (adapter or full), HF model dir, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tunesmith", description="Fine-tune, quantize and measure causal LLMs on CPU.")
    from tunesmith import __version__

    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
    for verb, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "train":
            p.add_argument("config", nargs="?", help="YAML config file (optional)")
            p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=60")
            p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        elif verb == "generate":
            _add_model_args(p)
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--prompt", help="one prompt")
            src.add_argument("--file", help=".txt (one prompt a line) or .jsonl with a prompt/question field")
            p.add_argument("--out", help="write JSONL results here instead of printing")
            p.add_argument("--batch-size", type=int, default=16)
        elif verb == "chat":
            _add_model_args(p)
        elif verb == "quickstart":
            p.add_argument("--out", default="out/quickstart-demo", help="output dir of the LoRA run")
            p.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/quickstart.yaml")
        elif verb == "merge":
            p.add_argument("run_dir", help="run dir with a LoRA/DoRA adapter")
            p.add_argument("--out", help="output dir (default: RUN_DIR-merged)")
            p.add_argument("--force", action="store_true", help="replace a non-empty output dir")
        elif verb == "export":
            p.add_argument("model", help="run dir (adapter merged first), HF model dir, .gguf file, or smollm2-135m-instruct")
            p.add_argument("--format", choices=["gguf"], default="gguf")
            p.add_argument("--quant", choices=["f32", "f16", "q8_0", "q4_0"], default="f16")
            p.add_argument("--out", help="output .gguf (default: RUN/export/model-QUANT.gguf, or ./NAME-QUANT.gguf)")
            p.add_argument("--force", action="store_true", help="replace an existing output file")
            p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                           help="check the GGUF in llama.cpp against the fp32 model (default: when llama_cpp is installed)")
            p.add_argument("--eval-text", help="UTF-8 text for the perplexity check (default: the bundled general_text.txt)")
        elif verb == "quantize":
            p.add_argument("model", help="run dir (adapter merged first), HF model dir, .gguf file, or smollm2-135m-instruct")
            p.add_argument("--method", choices=["int8", "int4"], required=True)
            p.add_argument("--out", help="output dir (default: RUN/export/model-METHOD, or ./NAME-METHOD)")
            p.add_argument("--force", action="store_true", help="replace a non-empty output dir")
            p.add_argument("--eval-text", help="UTF-8 text for the perplexity check (default: the bundled general_text.txt)")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    from tunesmith.errors import UserError

    _quiet_libraries()
    target, _ = COMMANDS[args.verb]
    module_name, func_name = target.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
