"""`tunesmith merge`, `tunesmith export` (GGUF + verification) and `tunesmith quantize` → `tunesmith.export`.

Exit codes: 0 done; 2 bad input (one line); 3 the GGUF was written but failed verification
against the fp32 model (a WARNING line says why; the file and its report are kept).
"""

import importlib.util
import sys
from pathlib import Path

VERIFY_FAILED = 3


def run_merge(args) -> int:
    from tunesmith.export.merge import dir_size, merge_run

    out = merge_run(args.run_dir, args.out, force=args.force)
    print(f"tunesmith: merged {args.run_dir} → {out} ({dir_size(out) / 2**20:.1f} MiB)")
    return 0


def _check_eval_text(path) -> None:
    from tunesmith.errors import UserError

    if path and not Path(path).expanduser().is_file():
        raise UserError(f"--eval-text: {path} not found; expected a UTF-8 text file")


def run_export(args) -> int:
    from tunesmith.export.gguf import export_gguf, modelfile_path
    from tunesmith.export.verify import report_path, report_table, verify_export

    from tunesmith.errors import UserError

    _check_eval_text(args.eval_text)
    verify, installed = args.verify, importlib.util.find_spec("llama_cpp") is not None
    if verify and not installed:
        raise UserError("--verify: needs llama-cpp-python (pip install 'tunesmith[gguf]'); or pass --no-verify")
    if verify is None:
        verify = installed
        if not verify:
            print("tunesmith: llama-cpp-python is not installed, so the GGUF is not verified "
                  "(pip install 'tunesmith[gguf]', or pass --no-verify to silence this)")
    out = export_gguf(args.model, args.out, quant=args.quant, force=args.force)
    modelfile = modelfile_path(out)
    print(f"tunesmith: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant})")
    print(f"tunesmith: wrote {modelfile} (ollama create NAME -f {modelfile})")
    report = verify_export(args.model, out, args.quant, eval_text=args.eval_text, verify=verify)
    print(report_table(report["table"]))
    print(f"tunesmith: wrote {report_path(out)}")
    if verify and not report["passed"]:
        print(f"tunesmith: WARNING: {out} failed verification against the fp32 model: {'; '.join(report['failures'])} "
              f"(file kept; details in {report_path(out)})", file=sys.stderr)
        return VERIFY_FAILED
    return 0


def run_quantize(args) -> int:
    from tunesmith.export.quantize import quantize_with_report
    from tunesmith.export.verify import report_table

    _check_eval_text(args.eval_text)
    report = quantize_with_report(args.model, args.out, method=args.method, force=args.force, eval_text=args.eval_text)
    print(f"tunesmith: wrote {report['path']} ({report['size_mib']:.1f} MiB of {args.method} weights)")
    print(report_table(report["table"]))
    print(f"tunesmith: wrote {Path(report['path']) / 'report.json'}")
    return 0
