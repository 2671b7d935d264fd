"""Fine-tuning methods: full · LoRA · DoRA · QLoRA (via PEFT) applied to a loaded model.

Contract:
- `apply_method(model, adapter_cfg, frozen_dtype="fp32")` returns the model to train: the same
  model with every parameter trainable for `full`, or a `peft.PeftModel` with only adapter
  weights trainable. `qlora` is LoRA over a base whose linear layers are stored in NF4
  (`adapters.storage`) and dequantized per matmul; its adapter is an ordinary LoRA adapter, so it
  loads, merges and exports on the unquantized base exactly like a `lora` run's.
  `frozen_dtype="bf16"` stores every weight that does not train in bf16 (upcast per matmul).
  Target modules default to every linear projection except the output head (PEFT's
  `all-linear`); a name that matches no module is a `UserError` listing the ones that exist.
"""

from __future__ import annotations

from tunesmith.config import AdapterConfig
from tunesmith.errors import UserError


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
    if cfg.method in ("lora", "dora", "qlora") and cfg.fused:
        from tunesmith.adapters.fused_lora import FusedLoraLinear

        peft_cfg._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    return get_peft_model(model, peft_cfg)


def compress_base(model, cfg: AdapterConfig, frozen_dtype: str = "fp32"):
    """Store the frozen base compactly before PEFT wraps it: 4-bit (`quant_type`) linears for qlora (embeddings
    too with `quantize_embeddings`), bf16 for whatever else `frozen_dtype` says."""
    import torch

    from tunesmith.adapters.storage import compress_frozen

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
    from tunesmith.adapters.storage import stored_parameters

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + stored_parameters(model)
    return trainable, total
