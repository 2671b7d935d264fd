"""Weight-only int8 / int4 quantization for PyTorch CPU inference, saved without pickle.

Contract:
- `quantize_tensors(model, method, group_size)` → `(tensors, manifest)`: every `nn.Linear` except
  the output head becomes integer weights plus scales; all other tensors (embeddings, norms,
  biases) stay fp32. The output head stays fp32 because it is usually tied to the embedding
  (quantizing it would untie and duplicate it) and is the layer most sensitive to rounding.
    int8: per-output-channel symmetric, `scale = max|w| / 127`; `<name>.qweight` int8 [out, in],
      `<name>.scales` fp32 [out].
    int4: per-group symmetric along the input dim (`group_size` 32, as llama.cpp's q4_0), the
      largest-magnitude weight of a group mapped to code -8 (`scale = that weight / -8`), codes
      q+8 in 0..15 packed two per uint8 (even column in the low nibble); `<name>.qweight` uint8
      [out, in/2], `<name>.scales` fp32 [out, in/group]. A Linear whose input width is not a
      multiple of 32 stays fp32.
- `save_quantized(model_spec, out_dir=None, method="int8", force=False)` loads the model (a run's
  adapter merged first), writes `quantized.safetensors`, `quantization.json` (format, method,
  group size, the quantized modules), `config.json`, the tokenizer and the run's `tunesmith.yaml`,
  under a temporary name renamed into place. Default dir: `<run>/export/model-<method>` for a run,
  else `./<name>-<method>`. A non-empty dir is refused unless `force`.
- `load_quantized(dir)` → `(model, tokenizer)`: builds the model from `config.json`, loads the fp32
  tensors and swaps each quantized Linear for a module running PyTorch's own CPU kernels:
    int8 → `Int8Linear` on `torch._weight_int8pack_mm`, int4 → `Int4Linear` on
      `aten._weight_int4pack_mm_for_cpu` (the kernels torchao's CPU layouts call), both with bf16
      activations; the weights stay integers in memory. Kernel layouts are rebuilt at load, so the files
      stay portable; where the int4 kernel is missing, weights are dequantized on the fly.
- `quantize_with_report(...)` is what `tunesmith quantize` runs: save, reload, and measure the
  quantized model against fp32 (perplexity on the same ids, HF greedy tokens/s, greedy agreement);
  writes `report.json` into the dir.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import UserError
from tunesmith.io import check_not_input, replace_dir, replacing
from tunesmith.rundir import CONFIG, RunDir

METHODS = ("int8", "int4")
FORMAT = "tunesmith-quantized/1"
WEIGHTS = "quantized.safetensors"
MANIFEST = "quantization.json"
GROUP_SIZES = (32, 64)


def _quantizable(model) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.float()


def int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in/2], scales fp32 [out, in/group]).

    As llama.cpp's q4_0: the weight of largest magnitude in a group maps exactly to code -8, so all
    16 levels are used (max|w|/7 wastes one; on SmolLM2 that costs 25% more perplexity than this).
    """
    out_f, in_f = w.shape
    grouped = w.reshape(out_f, in_f // group, group)
    peak = torch.gather(grouped, -1, grouped.abs().argmax(dim=-1, keepdim=True))[..., 0]
    scales = peak / -8
    scales = torch.where(scales.abs() < 1e-12, torch.ones_like(scales), scales)  # an all-zero group
    codes = (torch.round(grouped / scales[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales.float()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] → codes 0..15 as int32 [out, in]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def quantize_tensors(model, method: str, group_size: int = 32) -> tuple[dict, dict]:
    if method not in METHODS:
        raise UserError(f"expected one of {', '.join(METHODS)}, got {method}", key="method")
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    modules = {}
    for name, lin in _quantizable(model):
        w = lin.weight.detach().float()
        if method == "int8":
            q, s = int8_codes(w)
            entry = {"in": w.shape[1], "out": w.shape[0]}
        else:
            group = next((g for g in (group_size, *GROUP_SIZES) if w.shape[1] % g == 0), None)
            if group is None:
                continue
            q, s = int4_codes(w, group)
            entry = {"in": w.shape[1], "out": w.shape[0], "group_size": group}
        del state[f"{name}.weight"]
        state[f"{name}.qweight"], state[f"{name}.scales"] = q.contiguous(), s.contiguous()
        modules[name] = entry
    # safetensors refuses tensors that share memory (a tied head); the head is rebuilt by tie_weights.
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        state.pop("lm_head.weight", None)
    manifest = {
        "format": FORMAT,
        "method": method,
        "group_size": group_size if method == "int4" else None,
        "scheme": "symmetric, weight-only",
        "modules": modules,
    }
    return state, manifest


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W in 4-bit groups; PyTorch's CPU int4 kernel when it is there."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features, self.group = packed.shape[0], packed.shape[1] * 2, group
        codes = unpack_int4(packed)
        # The packed CPU layout tiles output rows by 16; other shapes take the dequantizing path.
        self.kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0
        if self.kernel:
            self.register_buffer(
                "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False
            )
            # The kernel computes (code - 8) * scale + zero per group; symmetric means zero = 0.
            sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous()
            self.register_buffer("scales_zeros", sz.to(torch.bfloat16), persistent=False)
        else:
            self.register_buffer("codes", codes.to(torch.int8) - 8, persistent=False)
            self.register_buffer("scales", scales, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel:
            # bf16 activations: the fp32 path of this kernel is ~20x slower on CPU (measured).
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, self.group, self.scales_zeros
            ).to(x.dtype)
        else:
            w = self.codes.reshape(self.out_features, -1, self.group).float() * self.scales[..., None]
            y = flat @ w.reshape(self.out_features, self.in_features).t().to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W as int8 rows and one scale per row; PyTorch's CPU int8 kernel.

    Weight-only on purpose: `quantize_dynamic` (which also quantizes activations, per tensor) is
    as fast here but multiplied SmolLM2's perplexity by 2.7 — its activations have outliers.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.kernel = hasattr(torch, "_weight_int8pack_mm")
        # A fresh, aligned copy: tensors straight from a safetensors file may sit at any byte
        # offset, and the kernel's vector loads segfaulted on such a one (tiny model, torch 2.13).
        self.register_buffer("qweight", qweight.clone(memory_format=torch.contiguous_format), persistent=False)
        # bf16 activations and scales: this kernel's fp32 path is ~9x slower on CPU (measured).
        self.register_buffer("scales", scales.to(torch.bfloat16) if self.kernel else scales, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel:
            y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.scales).to(x.dtype)
        else:
            y = flat @ (self.qweight.to(x.dtype) * self.scales[:, None].to(x.dtype)).t()
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path}: cannot read the quantization manifest ({type(err).__name__}); "
            "expected a dir written by tunesmith quantize"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("method") not in METHODS:
        raise UserError(
            f"{path}: format {manifest.get('format')!r} / method {manifest.get('method')!r} "
            f"is not {FORMAT} with one of {', '.join(METHODS)}"
        )
    return manifest


def load_quantized(directory):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.models import check_safetensors, load_tokenizer

    directory = Path(directory).expanduser()
    manifest = _read_manifest(directory)
    check_safetensors(directory)
    state = load_file(str(directory / WEIGHTS))
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantized = {
        name: (state.pop(f"{name}.qweight"), state.pop(f"{name}.scales"), state.pop(f"{name}.bias", None))
        for name in manifest["modules"]
    }
    # Plain tensors load first, while every module is still the nn.Linear they were saved from.
    missing, unexpected = model.load_state_dict(state, strict=False)
    swapped = {f"{name}.weight" for name in quantized} | {f"{name}.bias" for name in quantized}
    missing = [k for k in missing if k not in swapped and k != "lm_head.weight"]  # tied: set below
    if missing or unexpected:
        raise UserError(
            f"{directory / WEIGHTS}: tensors do not fit config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, (q, s, bias) in quantized.items():
        group = manifest["modules"][name].get("group_size")
        model.set_submodule(
            name, Int8Linear(q, s, bias) if manifest["method"] == "int8" else Int4Linear(q, s, group, bias)
        )
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.eval().requires_grad_(False)
    return model, load_tokenizer(str(directory))


def default_quantize_dir(spec: str, method: str) -> Path:
    from tunesmith.export.gguf import default_export_path

    return default_export_path(spec, method).with_suffix("")


def output_dir(model_spec: str, out_dir, method: str, force: bool) -> Path:
    out = Path(out_dir).expanduser() if out_dir else default_quantize_dir(model_spec, method)
    check_not_input(out, [model_spec], key="out_dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory", key="out_dir")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass force=True to replace it, or choose another dir", key="out_dir")
    return out


def save_quantized(
    model_spec: str, out_dir=None, method: str = "int8", force: bool = False, model=None, tokenizer=None
) -> Path:
    """Quantize and write the dir; pass `model`/`tokenizer` when the caller has them loaded already."""
    if method not in METHODS:
        raise UserError(f"expected one of {', '.join(METHODS)}, got {method}", key="method")
    out = output_dir(model_spec, out_dir, method, force)
    with replacing(out, key="out_dir"):  # a second writer is refused; killed writes' leftovers go
        return _save(model_spec, out, method, model, tokenizer)


def _save(model_spec: str, out: Path, method: str, model, tokenizer) -> Path:
    from safetensors.torch import save_file

    from tunesmith.export.merge import load_merged

    if model is None:
        model, tokenizer = load_merged(model_spec)
    state, manifest = quantize_tensors(model, method)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "method": method})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        run = RunDir(model_spec)
        if run.has_config:  # generate/chat read data.system_prompt from it
            shutil.copy2(run.config_path, tmp / CONFIG)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def quantize_with_report(
    model_spec: str, out_dir=None, method: str = "int8", force: bool = False, eval_text=None
) -> dict:
    """`save_quantized`, then measure the fp32 model and the reloaded quantized one on the same
    ids and prompts; writes `report.json` into the dir and returns it."""
    if method not in METHODS:
        raise UserError(f"expected one of {', '.join(METHODS)}, got {method}", key="method")
    with replacing(output_dir(model_spec, out_dir, method, force), key="out_dir"):  # before minutes of loading
        return _quantize_with_report(model_spec, out_dir, method, force, eval_text)


def _quantize_with_report(model_spec: str, out_dir, method: str, force: bool, eval_text) -> dict:
    from tunesmith.data.sft import ensure_chat_template
    from tunesmith.export.merge import load_merged
    from tunesmith.export.verify import (
        DEFAULT_TEXT,
        PROMPTS,
        end_ids,
        eval_budget,
        eval_ids,
        mib,
        reference_row,
        same_greedy,
        torch_perplexity,
        torch_speed,
        write_report,
    )

    model, tokenizer = load_merged(model_spec)
    out = save_quantized(model_spec, out_dir, method, force, model=model, tokenizer=tokenizer)
    ensure_chat_template(tokenizer)  # measuring only: the saved tokenizer is left as it was
    ids = eval_ids(tokenizer, eval_text, eval_budget(model))
    ref, ref_greedy = reference_row(model, tokenizer, ids)
    del model
    qmodel, qtok = load_quantized(out)
    ensure_chat_template(qtok)
    tok_s, greedy = torch_speed(qmodel, qtok)
    stops = end_ids(qtok)
    matches = sum(same_greedy(a, b, stops) for a, b in zip(greedy, ref_greedy))
    ppl = torch_perplexity(qmodel, ids)
    row = {
        "format": f"PyTorch {method}",
        "size_mib": mib(out / WEIGHTS),
        "ppl": ppl,
        "ppl_ratio": ppl / ref["ppl"],
        "tok_s": tok_s,
        "greedy": f"{matches}/{len(PROMPTS)}",
    }
    report = {
        "format": method,
        "path": str(out),
        "size_mib": row["size_mib"],
        "eval_text": str(eval_text or DEFAULT_TEXT),
        "manifest": _read_manifest(out),
        "table": [ref, row],
    }
    report["manifest"].pop("modules")
    write_report(out / "report.json", report)
    return report
