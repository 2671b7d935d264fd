"""The model a run trains, built one way for the training loop and for `fit`'s probes.

Contract:
- `base_dtype(method, frozen_dtype)`: the dtype base weights are loaded in — bf16 when an adapter
  run keeps its frozen weights in bf16 (no fp32 copy of the frozen base is ever made), else fp32.
- `load_base(cfg, resolved, frozen_dtype)`: the pretrained weights in that dtype (training).
- `random_base(cfg, hf_config, frozen_dtype)`: the same architecture with random weights in the
  same dtype (fit's probes: shallow copies of the real widths, no weights read), with eager
  attention where the family has no SDPA, as `load_model` builds the real one.
- `make_trainable(model, cfg, device, dist, frozen_dtype, checkpointing=True)` → `kernels.Prepared`:
  gradient checkpointing when the run asks for it and `checkpointing` allows, the fine-tuning
  method (`adapters.methods.apply_method`), then `kernels.prepare` (fast paths, device, groups).
  The loop and fit both call it, so what fit measures is what the loop trains.
"""

from __future__ import annotations

import torch

from tunesmith.adapters.methods import apply_method
from tunesmith.config import Config
from tunesmith.models import load_model, sdpa_unsupported
from tunesmith.train.kernels import Prepared, prepare


def base_dtype(method: str, frozen_dtype: str) -> torch.dtype:
    return torch.bfloat16 if frozen_dtype == "bf16" and method != "full" else torch.float32


def load_base(cfg: Config, resolved: str, frozen_dtype: str):
    m = cfg.model
    return load_model(
        resolved,
        dtype=base_dtype(cfg.adapter.method, frozen_dtype),
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        attn_implementation=m.attn_implementation,
    )


def random_base(cfg: Config, hf_config, frozen_dtype: str, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    attn = attn_implementation or cfg.model.attn_implementation
    try:
        return AutoModelForCausalLM.from_config(
            hf_config,
            dtype=base_dtype(cfg.adapter.method, frozen_dtype),
            attn_implementation=attn,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except ValueError as err:
        if not sdpa_unsupported(err, attn):
            raise
        return random_base(cfg, hf_config, frozen_dtype, "eager")  # as `load_model` builds the real one


def make_trainable(
    model, cfg: Config, device: torch.device, dist, frozen_dtype: str, checkpointing: bool = True
) -> Prepared:
    if cfg.train.gradient_checkpointing and checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_method(model, cfg.adapter, frozen_dtype)
    return prepare(model, cfg, device, dist)
