"""Importance matrix for llama.cpp's quantizer, measured by tunesmith on a calibration text.

Contract:
- `collect_imatrix(model, windows, arch) -> {gguf tensor name: float32 array}`: runs the fp32
  PyTorch model over each token-id window and, for every matrix llama.cpp multiplies by (each
  `nn.Linear` of the decoder, and the output head — named `token_embd.weight` when tied), keeps
  the mean over tokens of each input column's squared activation. That is what llama.cpp's
  `llama-imatrix` records (`in_sum2 / counts`) and what `llama-quantize --imatrix` hands the
  quantizer: one value per column (`ncols` floats) under the GGUF tensor's name. The GGUF's
  row permutation of q/k (`gguf.permute_rotary`) touches output rows only, so columns match.
- `calibration_windows(tokenizer, text_path=None, window, max_tokens)` (window: `model_window(model)`,
  512 or the model's shorter context; max_tokens 1024) → token-id windows of the
  calibration text (default: the bundled quickstart documents — never the verification text
  `verify.DEFAULT_TEXT`, so a perplexity check is not scored on what the quantizer was tuned to).
- `as_params(imatrix)` → (ctypes array of `llama_model_imatrix_data`, NULL-terminated, and the
  buffers it points into, which must outlive the quantize call).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tunesmith.export.verify import text_ids

CALIBRATION = Path(__file__).resolve().parents[1] / "resources" / "quickstart" / "documents"
WINDOW = 512
MAX_TOKENS = 1024


def model_window(model) -> int:
    """`WINDOW`, or the model's own context when shorter (positions past it would measure extrapolation)."""
    return min(WINDOW, getattr(model.config, "max_position_embeddings", None) or WINDOW)


def calibration_windows(tokenizer, text_path=None, window: int = WINDOW, max_tokens: int = MAX_TOKENS):
    path = Path(text_path).expanduser() if text_path else CALIBRATION
    files = sorted(path.glob("*.md")) + sorted(path.glob("*.txt")) if path.is_dir() else [path]
    expected, use = "a UTF-8 calibration text", "the importance matrix"
    ids = text_ids(tokenizer, path, files, max_tokens, "imatrix_text", expected, use)
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]


@torch.no_grad()
def collect_imatrix(model, windows, arch: str = "llama") -> dict[str, np.ndarray]:
    from tunesmith.export.gguf import gguf_tensor_name

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    head = model.get_output_embeddings()
    for hf_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            name = "token_embd.weight" if tied else "output.weight"
        else:
            name = gguf_tensor_name(f"{hf_name}.weight", arch)
        if name is not None:
            hooks.append(module.register_forward_hook(hook_for(name)))
    try:
        for ids in windows:
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def as_params(imatrix: dict[str, np.ndarray]):
    """The NULL-terminated `llama_model_imatrix_data` array llama.cpp's quantizer reads."""
    import ctypes

    import llama_cpp

    keep = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [data, encoded]
        entries[i].name = encoded
        entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = data.size
    entries[len(imatrix)].name = None
    return entries, keep
