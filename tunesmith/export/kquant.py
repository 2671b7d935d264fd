"""K-quant GGUF files (q4_k_m, q5_k_m, q6_k) made by llama.cpp's own quantizer, not by tunesmith.

Contract:
- `K_QUANTS` maps tunesmith's names to llama.cpp's file types (`LLAMA_FTYPE_MOSTLY_Q4_K_M`, ...).
- `export_kquant(model_spec, out_path=None, quant="q4_k_m", force=False) -> Path` writes an f32 GGUF
  with `gguf.export_gguf` into a temporary directory beside the output, runs
  `llama_cpp.llama_model_quantize` over it (llama.cpp's default quantize parameters: its per-tensor
  mix for the _M types, the output head kept wider, a tensor whose rows are not a whole number of
  256-wide blocks falling back to a type that fits), and renames the result into place; the temporary
  directory is always removed, so a failure leaves nothing behind. The quantizer gets an importance
  matrix (`imatrix.py`) measured on the merged fp32 model over `calibration` (default: the bundled
  quickstart documents), as `llama-quantize --imatrix` would: `imatrix=True` (default) measures it,
  a dict ({GGUF tensor name: per-column values}) is used as given, False quantizes without one.
  The Ollama `Modelfile` the f32 export wrote is moved beside the output with its `FROM` line
  pointing at the K-quant file (the same `Modelfile` / `<name>.Modelfile` rule as
  `gguf.modelfile_path`).
- `quantize_gguf(src, dst, quant, nthread, imatrix=None)` is the quantizer call alone (llama.cpp
  reads `src`, writes `dst`); a non-zero return is a one-line `UserError`.
- Without llama-cpp-python installed, one line naming the extra to install (`tunesmith[gguf]`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.io import write_atomic

# tunesmith name → llama.cpp's `LLAMA_FTYPE_*` constant name (resolved when llama_cpp is imported).
K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
NEEDS = "needs llama-cpp-python, which runs llama.cpp's quantizer: pip install 'tunesmith[gguf]'"


def require_llama_cpp(quant: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"--quant {quant}: {NEEDS}", key="quant")


def quantize_gguf(src: Path, dst: Path, quant: str, nthread: int | None = None, imatrix: dict | None = None) -> Path:
    """llama.cpp's quantizer, `src` (f32/f16 GGUF) → `dst` in `quant`, weighted by `imatrix`
    ({GGUF tensor name: per-column mean squared activation}) when given."""
    require_llama_cpp(quant)
    import llama_cpp

    from tunesmith.export.imatrix import as_params

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = nthread or os.cpu_count() or 1
    entries, buffers = as_params(imatrix) if imatrix else (None, None)  # both must outlive the call
    if entries is not None:
        params.imatrix = entries
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0 or not dst.is_file():
        raise UserError(f"{src}: llama.cpp's quantizer failed to write {quant} (return code {code})", key="quant")
    return dst


def _place_modelfile(written: Path | None, out: Path) -> None:
    """Move the temporary export's Modelfile beside `out`, its FROM line naming `out`."""
    from tunesmith.export.gguf import modelfile_path

    if written is None or not written.is_file():
        return
    lines = written.read_text(encoding="utf-8").splitlines()
    lines[0] = f"FROM ./{out.name}"
    write_atomic(modelfile_path(out), "\n".join(lines) + "\n")


def model_imatrix(model_spec: str, calibration=None) -> dict:
    """The importance matrix of `model_spec` (merged, fp32) over the calibration text."""
    from tunesmith.export.gguf import ARCHITECTURES
    from tunesmith.export.imatrix import calibration_windows, collect_imatrix, model_window
    from tunesmith.export.merge import load_merged

    model, tokenizer = load_merged(model_spec)
    model.eval()
    windows = calibration_windows(tokenizer, calibration, model_window(model))
    return collect_imatrix(model, windows, ARCHITECTURES.get(model.config.model_type, "llama"))


def export_kquant(
    model_spec: str, out_path=None, quant: str = "q4_k_m", force: bool = False, calibration=None, imatrix=True
) -> Path:
    from tunesmith.export.gguf import default_export_path, export_gguf

    if quant not in K_QUANTS:
        raise UserError(f"expected one of {', '.join(K_QUANTS)}, got {quant}", key="quant")
    require_llama_cpp(quant)
    out = Path(out_path).expanduser() if out_path else default_export_path(model_spec, quant)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"{out} must end in .gguf", key="out_path")
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a file path ending in .gguf", key="out_path")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass force=True to replace it", key="out_path")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.tmp-", dir=out.parent))
    try:
        # Named like the output, so the file's general.name is the output's stem.
        source = export_gguf(model_spec, work / out.name, quant="f32")
        weights = imatrix if isinstance(imatrix, dict) else model_imatrix(model_spec, calibration) if imatrix else None
        quantized = quantize_gguf(source, work / f"{out.stem}.{quant}.gguf", quant, imatrix=weights)
        with open(quantized, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(quantized, out)
        _place_modelfile(next(work.glob("*Modelfile"), None), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
