"""`tunesmith quantize MODEL --method int8|int4 [--out DIR]` → `export.quantize.quantize_with_report`:
weight-only int8/int4 for PyTorch CPU inference, measured against the fp32 model."""

from __future__ import annotations

from pathlib import Path

from tunesmith.commands.export import add_eval_text, check_eval_text

HELP = "int8/int4 weight-only quantization for PyTorch CPU inference"
FLAGS = {"out_dir": "--out", "method": "--method", "eval_text": "--eval-text", "force=True": "--force"}


def add_arguments(p) -> None:
    p.add_argument("model", help="run dir (adapter merged first), HF model dir, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--method", choices=["int8", "int4"], required=True)
    p.add_argument("--out", help="output dir (default: RUN/export/model-METHOD, or ./NAME-METHOD)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output dir")
    add_eval_text(p)


def run(args) -> int:
    from tunesmith.export.quantize import quantize_with_report
    from tunesmith.export.verify import report_table

    check_eval_text(args.eval_text)
    report = quantize_with_report(args.model, args.out, method=args.method, force=args.force, eval_text=args.eval_text)
    print(f"tunesmith: wrote {report['path']} ({report['size_mib']:.1f} MiB of {args.method} weights)")
    print(report_table(report["table"]))
    print(f"tunesmith: wrote {Path(report['path']) / 'report.json'}")
    return 0
