"""A LoRA run's adapter alone as a GGUF LoRA that llama.cpp (and Ollama's `ADAPTER`) loads over a base GGUF.

Contract:
- `export_adapter(run_dir, out_path=None, base_quant="f16", force=False) -> (adapter, base, modelfile)`
  writes the adapter in llama.cpp's LoRA format (what its `convert_lora_to_gguf.py` writes):
  `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, the base's
  architecture, and for every adapted matrix `<llama.cpp name>.lora_a` (PEFT's A, [rank, in]) and
  `.lora_b` (PEFT's B, [out, rank]) in f32. B's rows of q/k get the same RoPE permutation the base
  export applies to q/k (`gguf.permute_rotary`), so `B @ A` lines up with the permuted base weight.
  llama.cpp scales each pair by alpha / rank; a module whose PEFT scaling differs (rsLoRA, alpha or
  rank patterns) has that factor folded into its B, so the product is always PEFT's.
  Beside it: the run's un-tuned base model as a GGUF (`base-<quant>.gguf`, default f16, written by
  `gguf.export_gguf`; reused when already there unless `force`), and an Ollama Modelfile with
  `FROM ./base-….gguf` and `ADAPTER ./adapter.gguf` (template, stops and the run's system prompt
  as `gguf.write_modelfile` writes them) — `Modelfile`, or `adapter.Modelfile` when a `Modelfile`
  for another export is already there. Default output: `<run>/export/adapter.gguf`.
- Refused, one line, before anything is written: a path that is not a finished LoRA run, a full
  fine-tune, a DoRA run (llama.cpp has no DoRA), an adapter that also trains whole modules or
  token rows (`modules_to_save`, `trainable_token_indices`), a LoRA on the embedding or on a head
  tied to it, and an architecture other than `ARCHITECTURES`.
- `verify_adapter(run_dir, adapter, base, base_quant, eval_text, verify)` runs base + adapter in
  llama.cpp (`verify.verify_gguf(lora_path=...)`) against the merged fp32 model and writes
  `adapter.report.json`; at f16/f32 the "lora" threshold applies (greedy tokens on ≥ 9/10 prompts).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tunesmith.errors import UserError
from tunesmith.io import write_atomic
from tunesmith.rundir import ADAPTER_CONFIG, RunDir

ARCHITECTURES = ("llama", "mistral", "qwen2")  # the families the adapter round trip is tested on
DEFAULT_NAME = "adapter.gguf"


def check_adapter_run(run_dir) -> RunDir:
    """The run, if its adapter can be written as a llama.cpp LoRA; else a one-line `UserError`."""
    path = Path(run_dir).expanduser()
    run = RunDir(path)
    if run.kind == "full":
        raise UserError(
            f"{path}: a full model (full fine-tune or base) has no adapter to export; export it whole: "
            f"tunesmith export {path}"
        )
    if run.kind != "adapter":
        raise UserError(f"{path}: --adapter needs a LoRA run dir (with {ADAPTER_CONFIG}) written by tunesmith train")
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path / ADAPTER_CONFIG}: cannot read it ({type(err).__name__})") from None
    if cfg.get("use_dora"):
        raise UserError(f"{path}: a DoRA adapter cannot be a llama.cpp LoRA (llama.cpp has no DoRA); export it merged")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: a {cfg.get('peft_type')} adapter cannot be a llama.cpp LoRA; export it merged")
    for key in ("modules_to_save", "trainable_token_indices"):
        if cfg.get(key):
            raise UserError(
                f"{path}: the adapter also trains {key} ({cfg[key]}), which a llama.cpp LoRA cannot hold; "
                "export it merged"
            )
    return run


def lora_tensors(model, arch: str) -> tuple[list[tuple[str, np.ndarray]], float]:
    """`([(gguf name, array)], alpha)`: every LoRA pair of a PeftModel, in llama.cpp's layout."""
    from tunesmith.export.gguf import gguf_tensor_name, permute_rotary

    config = model.get_base_model().config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    alpha = float(model.peft_config["default"].lora_alpha)
    out = []
    for name, module in model.named_modules():
        if getattr(module, "lora_embedding_A", None):
            raise UserError(f"adapter: {name} is a LoRA on an embedding, which a llama.cpp LoRA cannot hold")
        if not getattr(module, "lora_A", None) or "default" not in module.lora_A:
            continue
        hf_name = name.removeprefix("base_model.model.") + ".weight"
        target = gguf_tensor_name(hf_name)
        tied = hf_name == "lm_head.weight" and config.tie_word_embeddings
        if target is None or tied:
            raise UserError(f"adapter: {hf_name} has no separate tensor in the GGUF, so a LoRA on it cannot be loaded")
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()
        rank, scaling = a.shape[0], float(module.scaling["default"])
        if not np.isclose(scaling, alpha / rank, rtol=1e-6):
            b = b * (scaling / (alpha / rank))  # llama.cpp applies alpha / rank
        if arch == "llama" and ".attn_q." in target:
            b = permute_rotary(b, n_head)
        elif arch == "llama" and ".attn_k." in target:
            b = permute_rotary(b, n_kv)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise UserError(f"adapter: {name} has NaN/inf values; retrain, or use an earlier checkpoint")
        out += [(target + ".lora_a", np.ascontiguousarray(a)), (target + ".lora_b", np.ascontiguousarray(b))]
    if not out:
        raise UserError("adapter: no LoRA matrices found")
    return out, alpha


def write_lora_gguf(path: Path, model, arch: str, name: str) -> Path:
    from tunesmith.export.gguf import write_gguf

    tensors, alpha = lora_tensors(model, arch)

    def fill(writer) -> None:
        writer.add_type("adapter")
        writer.add_name(name)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array.astype(np.float32))

    write_gguf(path, arch, fill)
    return path


def _modelfile_text(work: Path, adapter: Path, base: Path, tokenizer, system) -> str:
    from tunesmith.data.sft import ensure_chat_template
    from tunesmith.export.gguf import end_of_turn_id, ollama_template, write_modelfile

    ensure_chat_template(tokenizer)
    template, end = ollama_template(tokenizer)
    written = write_modelfile(work / adapter.name, tokenizer, template, end_of_turn_id(tokenizer, end), system)
    lines = written.read_text(encoding="utf-8").splitlines()
    return "\n".join([f"FROM ./{base.name}", f"ADAPTER ./{adapter.name}"] + lines[1:]) + "\n"


def check_base(base: Path, tensors) -> None:
    """A reused base GGUF must hold every tensor the adapter adapts, at the adapter's shapes."""
    from gguf import GGUFReader

    from tunesmith.models import check_gguf

    check_gguf(base)
    shapes = {t.name: [int(n) for n in t.shape] for t in GGUFReader(str(base)).tensors}
    for (name, a), (_, b) in zip(tensors[::2], tensors[1::2]):
        target = name.removesuffix(".lora_a")
        if shapes.get(target) != [a.shape[1], b.shape[0]]:  # GGUF lists dims innermost first
            raise UserError(f"{base}: not this run's base model (tensor {target} differs); pass --force to rewrite it")


def adapter_modelfile_path(adapter: Path, text: str) -> Path:
    path = adapter.parent / "Modelfile"
    if path.is_file() and path.read_text(encoding="utf-8").splitlines()[:2] != text.splitlines()[:2]:
        return adapter.with_suffix(".Modelfile")
    return path


def export_adapter(run_dir, out_path=None, base_quant: str = "f16", force: bool = False):
    from tunesmith.export.gguf import ARCHITECTURES as GGUF_ARCHS
    from tunesmith.export.gguf import export_gguf
    from tunesmith.infer.load import load_for_inference

    run = check_adapter_run(run_dir)
    out = Path(out_path).expanduser() if out_path else run.export_dir / DEFAULT_NAME
    if out.suffix.lower() != ".gguf":
        raise UserError(f"{out} must end in .gguf", key="out_path")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass force=True to replace it", key="out_path")
    base = out.with_name(f"base-{base_quant}.gguf")
    if base.resolve() == out.resolve():
        raise UserError(f"{out} is the base GGUF's name; choose another name", key="out_path")
    import torch

    model, tokenizer, _ = load_for_inference(str(run.path), dtype=torch.float32)
    model_type = model.get_base_model().config.model_type
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{run.path}: a {model_type} adapter cannot be exported as a GGUF LoRA yet; "
            f"supported: {', '.join(ARCHITECTURES)}; export it merged"
        )
    arch = GGUF_ARCHS[model_type]
    tensors, _ = lora_tensors(model, arch)  # every refusal (embedding, tied head, NaN) before a file is written
    if base.is_file() and not force:
        check_base(base, tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=out.parent))
    try:
        if force or not base.is_file():
            made = export_gguf(run.base_model(), work / base.name, quant=base_quant)
            os.replace(made, base)
        write_lora_gguf(out, model, arch, out.stem)
        text = _modelfile_text(work, out, base, tokenizer, run.system_prompt)
        modelfile = write_atomic(adapter_modelfile_path(out, text), text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, base, modelfile


def verify_adapter(run_dir, adapter: Path, base: Path, base_quant: str, eval_text=None, verify: bool = True) -> dict:
    """Base + adapter in llama.cpp against the merged fp32 model; writes `<adapter>.report.json`."""
    from tunesmith.export import verify as v

    quant = "lora" if base_quant in ("f32", "f16") else base_quant
    row = {"format": f"gguf {base_quant} + LoRA", "size_mib": v.mib(adapter)}
    report = {"format": "gguf-lora", "base": str(base), "adapter": str(adapter), "size_mib": row["size_mib"]}
    report.update(base_size_mib=v.mib(base), verified=verify)
    rows = [row]
    if verify:
        from tunesmith.data.sft import ensure_chat_template
        from tunesmith.export.merge import load_merged

        model, tokenizer = load_merged(str(run_dir))
        ensure_chat_template(tokenizer)
        ids = v.eval_ids(tokenizer, eval_text, v.eval_budget(model))
        logits = v.torch_logits(model, ids)
        ref, ref_greedy = v.reference_row(model, tokenizer, ids, logits=logits)
        result = v.verify_gguf(
            base,
            model,
            tokenizer,
            texts=[ids],
            quant=quant,
            reference_logits=[logits],
            reference_greedy=ref_greedy,
            lora_path=adapter,
        )
        row.update(v.result_cells(result))
        rows = [ref, row]
        report.update(passed=result["passed"], failures=result["failures"], verification=result)
        report["thresholds"] = v.THRESHOLDS.get(quant, {})
    report["table"] = rows
    v.write_report(v.report_path(adapter), report)
    return report
