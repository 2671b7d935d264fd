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
    "fit": ("tunesmith.commands.fit:run", "predict peak RAM, s/step and disk of a training run; say what makes it fit"),
    "data": ("tunesmith.commands.data:run", "data check DATA [--eval EVAL]: duplicates, leakage, empty answers, lengths, encoding"),
    "pretrain": ("tunesmith.commands.pretrain:run", "pre-train on raw text: from scratch (tokenizer + model preset) or continued"),
    "pipeline": ("tunesmith.commands.pretrain:run_pipeline", "pretrain → fine-tune → merge → export → compare from one config; resumable"),
    "compare": ("tunesmith.commands.compare:run", "fine-tuned vs prompt vs RAG vs fine-tuned+RAG on your questions: table, results.json, report.html"),
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
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="weights to generate with; auto = bf16 where bf16 matmuls pay (AMX, CUDA), else fp32")


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
            p.add_argument("--force", action="store_true", help="train even when the fit check predicts it will not fit")
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
            p.add_argument("--no-compare", dest="compare", action="store_false",
                           help="skip the closing fine-tuned vs prompt vs RAG comparison")
            p.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/quickstart.yaml")
        elif verb == "compare":
            p.add_argument("config", nargs="?", help="YAML config with a compare section (optional)")
            p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. compare.arms=[base,rag]")
        elif verb in ("pretrain", "pipeline"):
            p.add_argument("config", nargs="?", help="YAML config file (optional)")
            p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. pretrain.max_steps=200")
            if verb == "pretrain":
                p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
            else:
                p.add_argument("--from", dest="from_stage", choices=["pretrain", "finetune", "merge", "export", "compare"],
                               help="rerun from this stage (it and the later ones are cleared)")
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
        elif verb == "fit":
            p.add_argument("config", nargs="?", help="YAML config file (optional)")
            p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
            p.add_argument("--ram-gib", type=float, default=None,
                           help="RAM budget in GiB instead of what this machine has free (also TUNESMITH_RAM_GIB)")
            p.add_argument("--no-probe", action="store_true", help="memory only: skip timing the probe steps")
            p.add_argument("--json", help="also write the estimate as JSON here")
        elif verb == "data":
            p.add_argument("action", choices=["check"], help="check: data quality report")
            p.add_argument("data", nargs="+", help="training data files")
            p.add_argument("--eval", nargs="+", default=[], help="evaluation files, checked for leakage from the training data")
            p.add_argument("--config", help="take model, format, max_length, system prompt and template from this YAML")
            p.add_argument("--model", help="tokenizer for token lengths (default: the config's model.name)")
            p.add_argument("--max-length", type=int, default=None, help="flag samples longer than this many tokens (default: data.max_length)")
            p.add_argument("--json", help="write the full report as JSON here")
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
