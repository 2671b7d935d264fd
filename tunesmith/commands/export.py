"""`tunesmith export MODEL [--quant Q] [--out FILE] [--verify/--no-verify]` → `tunesmith.export_gguf`, then
the check in llama.cpp (`export.verify.verify_export`). K-quants (q4_k_m, q5_k_m, q6_k) are made by
llama.cpp's quantizer (`export.kquant`). `tunesmith export RUN --adapter` writes the LoRA alone as a
GGUF LoRA beside a GGUF of the base (`export.lora_gguf`), checked as base + adapter in llama.cpp.

Exit codes: 0 done; 2 bad input (one line); 3 the GGUF was written but failed verification
against the fp32 model (a WARNING line says why; the file and its report are kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from tunesmith.config import GGUF_QUANTS
from tunesmith.errors import UserError

HELP = "write a model or run as GGUF (f32/f16/q8_0/q4_0/q4_k_m/q5_k_m/q6_k), or a LoRA as a GGUF LoRA"
FLAGS = {"out_path": "--out", "quant": "--quant", "eval_text": "--eval-text", "force=True": "--force"}
VERIFY_FAILED = 3


def add_arguments(p) -> None:
    p.add_argument("model", help="run dir (adapter merged first), HF model dir, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--quant", choices=GGUF_QUANTS, default="f16", help="K-quants are made by llama.cpp (gguf extra)")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA run: write the adapter alone as a GGUF LoRA (+ the base GGUF at --quant, + Modelfile with ADAPTER)",
    )
    p.add_argument(
        "--out",
        help="output .gguf (default: RUN/export/model-QUANT.gguf, or ./NAME-QUANT.gguf; "
        "with --adapter: RUN/export/adapter.gguf)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check the GGUF in llama.cpp against the fp32 model (default: when llama_cpp is installed)",
    )
    add_eval_text(p)


def add_eval_text(p) -> None:
    p.add_argument("--eval-text", help="UTF-8 text for the perplexity check (default: the bundled general_text.txt)")


def check_eval_text(path) -> None:
    if path and not Path(path).expanduser().is_file():
        raise UserError(f"{path} not found; expected a UTF-8 text file", key="eval_text")


def run(args) -> int:
    from tunesmith import export_gguf
    from tunesmith.export.gguf import modelfile_path
    from tunesmith.export.kquant import K_QUANTS, require_llama_cpp
    from tunesmith.export.verify import report_path, report_table, verify_export

    check_eval_text(args.eval_text)
    verify, installed = args.verify, importlib.util.find_spec("llama_cpp") is not None
    if args.quant in K_QUANTS:
        require_llama_cpp(args.quant)
    if verify and not installed:
        raise UserError("--verify: needs llama-cpp-python (pip install 'tunesmith[llamacpp]'); or pass --no-verify")
    if verify is None:
        verify = installed
        if not verify:
            print(
                "tunesmith: llama-cpp-python is not installed, so the GGUF is not verified "
                "(pip install 'tunesmith[llamacpp]', or pass --no-verify to silence this)"
            )
    if args.adapter:
        out, report = _export_adapter(args, verify)
    else:
        out = export_gguf(args.model, args.out, quant=args.quant, force=args.force)
        modelfile = modelfile_path(out)
        print(f"tunesmith: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant})")
        print(f"tunesmith: wrote {modelfile} (ollama create NAME -f {modelfile})")
        report = verify_export(args.model, out, args.quant, eval_text=args.eval_text, verify=verify)
    print(report_table(report["table"]))
    print(f"tunesmith: wrote {report_path(out)}")
    if verify and not report["passed"]:
        print(
            f"tunesmith: WARNING: {out} failed verification against the fp32 model: {'; '.join(report['failures'])} "
            f"(file kept; details in {report_path(out)})" + _HINTS.get(args.quant, ""),
            file=sys.stderr,
        )
        return VERIFY_FAILED
    return 0


# what to try when a type fails: q4_0 has one scale per 32 weights; the K-quant keeps more at 4 bits
_HINTS = {"q4_0": "; for 4 bits try --quant q4_k_m"}


def _export_adapter(args, verify: bool):
    from tunesmith.export.lora_gguf import export_adapter, verify_adapter

    adapter, base, modelfile = export_adapter(args.model, args.out, base_quant=args.quant, force=args.force)
    print(f"tunesmith: wrote {adapter} ({adapter.stat().st_size / 2**20:.1f} MiB, LoRA)")
    print(f"tunesmith: base {base} ({base.stat().st_size / 2**20:.1f} MiB, {args.quant})")
    print(f"tunesmith: wrote {modelfile} (ollama create NAME -f {modelfile})")
    return adapter, verify_adapter(args.model, adapter, base, args.quant, eval_text=args.eval_text, verify=verify)
