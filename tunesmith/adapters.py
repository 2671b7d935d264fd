"""Fine-tuning methods (full · LoRA · DoRA · QLoRA via PEFT) and loading what training produced.

Contract:
- `apply_method(model, adapter_cfg, frozen_dtype="fp32")` returns the model to train: the same
  model with every parameter trainable for `full`, or a `peft.PeftModel` with only adapter
  weights trainable. `qlora` is LoRA over a base whose linear layers are stored in NF4
  (`tunesmith.nf4`) and dequantized per matmul; its adapter is an ordinary LoRA adapter, so it
  loads, merges and exports on the unquantized base exactly like a `lora` run's.
  `frozen_dtype="bf16"` stores every weight that does not train in bf16 (upcast per matmul).
  Target modules default to every linear projection except the output head (PEFT's
  `all-linear`); a name that matches no module is a `UserError` listing the ones that exist.
- `load_for_inference(spec)` takes a base model name, a full fine-tune output dir, or a LoRA
  run dir (base + adapter) and returns `(model, tokenizer, label)` ready for generation.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import AdapterConfig
from tunesmith.errors import UserError
from tunesmith.models import check_safetensors, load_model, load_tokenizer, resolve_model

RUN_CONFIG = "tunesmith.yaml"


def linear_module_names(model) -> list[str]:
    import torch

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_method(model, cfg: AdapterConfig, frozen_dtype: str = "fp32"):
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    if cfg.target_modules == ["all-linear"]:
        targets: str | list[str] = "all-linear"
    else:
        missing = [t for t in cfg.target_modules if t not in available]
        if missing:
            raise UserError(
                f"config key adapter.target_modules: no linear module named {', '.join(missing)}; "
                f"this model has: {', '.join(available)} (or all-linear)"
            )
        targets = list(cfg.target_modules)
    compress_base(model, cfg, frozen_dtype)
    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=cfg.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    if cfg.method == "lora" and cfg.fused:
        from tunesmith.fused_lora import FusedLoraLinear

        peft_cfg._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    return get_peft_model(model, peft_cfg)


def compress_base(model, cfg: AdapterConfig, frozen_dtype: str = "fp32"):
    """Store the frozen base compactly before PEFT wraps it: 4-bit (`quant_type`) linears for qlora (embeddings
    too with `quantize_embeddings`), bf16 for whatever else `frozen_dtype` says."""
    import torch

    from tunesmith.nf4 import compress_frozen

    bf16 = "bf16" if frozen_dtype == "bf16" else None
    linear = cfg.quant_type if cfg.method == "qlora" else bf16
    embeddings = cfg.quant_type if cfg.method == "qlora" and cfg.quantize_embeddings else bf16
    if linear or embeddings:
        compress_frozen(model, linear, embeddings, cfg.quant_block_size, cfg.double_quant)
    # A base loaded in bf16 (frozen_dtype=bf16) keeps its stored weights as buffers; what is
    # left as parameters (norms, biases, an untouched head) computes in fp32 like any run.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); weights held in a compact storage (qlora, bf16) count in total."""
    from tunesmith.nf4 import stored_parameters

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + stored_parameters(model)
    return trainable, total


def base_of_run(run_dir: Path) -> str:
    """The base model a LoRA run dir was trained from: its saved config, else PEFT's record."""
    import json

    import yaml

    cfg_path = run_dir / RUN_CONFIG
    if cfg_path.is_file():
        saved = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        name = (saved.get("model") or {}).get("name")
        if name:
            return name
    adapter_cfg = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    name = adapter_cfg.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{run_dir}/adapter_config.json: no base_model_name_or_path; cannot find the base model")
    return name


def load_for_inference(spec: str, device=None, dtype=None, trust_remote_code: bool = False):
    """Load a base model, a full fine-tune, or base + LoRA/DoRA adapter for generation."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from peft import PeftModel
        from safetensors import SafetensorError

        check_safetensors(path)
        base_name = base_of_run(path)
        base = load_model(resolve_model(base_name), dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            model = PeftModel.from_pretrained(base, str(path))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise UserError(f"{path}: cannot load the adapter ({str(err).splitlines()[0]})") from None
        tokenizer = load_tokenizer(str(path)) if (path / "tokenizer_config.json").is_file() else load_tokenizer(
            resolve_model(base_name)
        )
        label = f"{base_name} + adapter {path}"
    elif path.is_dir() and not (path / "config.json").is_file() and (path / RUN_CONFIG).is_file():
        raise UserError(f"{path}: this run dir has no finished model yet (no adapter or weights); finish or resume training")
    else:
        resolved = resolve_model(spec)
        model = load_model(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        label = spec
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, label
