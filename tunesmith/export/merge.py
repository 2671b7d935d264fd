"""Fold a LoRA/DoRA adapter into its base model and save a plain HF model directory.

Contract:
- `merge_run(run_dir, out_dir=None, force=False) -> Path` loads the run's base in fp32 plus
  its adapter (`adapters.load_for_inference`), folds the adapter in (`merge_and_unload`),
  refuses the result if any tensor is NaN/inf (naming it), and writes an HF safetensors dir
  with the tokenizer, its chat template and a copy of the run's `tunesmith.yaml`. The dir is
  built under a temporary name and renamed into place, so a crash never leaves half of it.
  `out_dir` defaults to `RUN_DIR-merged`; a non-empty one is refused unless `force`.
- `load_merged(spec)` is the in-memory version the GGUF export uses: `(model, tokenizer)`
  for any model spec, with an adapter folded in when `spec` is a LoRA/DoRA run dir.
- Truncated or corrupt weight files are caught where they are read (`models.check_gguf`,
  `models.check_safetensors`, `adapters.load_for_inference`), one line each.
Every user mistake raises `UserError` with one line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.infer.load import load_for_inference
from tunesmith.io import check_not_input, replace_dir, replacing
from tunesmith.rundir import ADAPTER_CONFIG, CONFIG, RunDir


def fold_adapter(model, source: Path):
    """Merge a PeftModel's adapter into its (fp32) base; refuse non-finite weights by name."""
    import torch

    # Check the adapter first so the message names the tensor that actually went bad.
    for name, param in model.named_parameters():
        if "lora_" in name and not torch.isfinite(param).all():
            raise UserError(
                f"{source}: adapter tensor {name} has NaN/inf values; retrain, or use an earlier checkpoint"
            )
    merged = model.merge_and_unload()
    check_finite(merged, source)
    return merged


def check_finite(model, source) -> None:
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{source}: tensor {name} has NaN/inf values after merging; refusing to save it")


def load_merged(spec: str):
    """`(model, tokenizer)` in fp32, eval mode; a run dir's adapter is folded into its base."""
    import torch

    model, tokenizer, _ = load_for_inference(spec, dtype=torch.float32)
    if RunDir(spec).kind == "adapter":
        model = fold_adapter(model, Path(spec))
    model.eval()
    return model, tokenizer


def default_merge_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + "-merged")


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        problem = "not a directory" if run_dir.exists() else "not found"
        raise UserError(f"{run_dir}: {problem}; expected a run dir written by tunesmith train")
    run = RunDir(run_dir)
    if run.kind == "adapter":
        return
    if run.kind == "full":
        raise UserError(
            f"{run_dir}: already a full model (no adapter to merge); export it directly: tunesmith export {run_dir}"
        )
    if run.has_config:
        raise UserError(f"{run_dir}: this run has no finished adapter yet; finish or resume training first")
    raise UserError(f"{run_dir}: no adapter here (no {ADAPTER_CONFIG}); expected a LoRA/DoRA run dir")


def _check_out_dir(out: Path, run_dir: Path, force: bool) -> None:
    check_not_input(out, [run_dir], key="out_dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory", key="out_dir")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass force=True to replace it, or choose another dir", key="out_dir")


def merge_run(run_dir, out_dir=None, force: bool = False) -> Path:
    run_dir = Path(run_dir).expanduser()
    _check_run_dir(run_dir)
    out = Path(out_dir).expanduser() if out_dir else default_merge_dir(run_dir)
    _check_out_dir(out, run_dir, force)
    with replacing(out, key="out_dir"):  # a second writer of `out` is refused; killed writes' leftovers go
        return _merge(run_dir, out)


def _merge(run_dir: Path, out: Path) -> Path:
    model, tokenizer = load_merged(str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        run = RunDir(run_dir)
        if run.has_config:
            # `generate`/`chat` read data.system_prompt from it, so the merged model answers
            # with the same system prompt the run was trained with.
            shutil.copy2(run.config_path, tmp / CONFIG)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
