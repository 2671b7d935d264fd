"""The weight a training matmul computes with, whatever storage holds it.

Contract:
- `autocast_bf16(x)`: whether `x`'s device is under bf16 autocast — the one autocast the fused
  training nodes (`adapters.fused_lora`, `train.kernels`, `train.loss`) run in themselves, wholly in bf16.
- `stored_weight(linear)`: the weight of a plain `nn.Linear` or of a frozen bf16-stored layer
  (`adapters.storage.BF16Storage`), as held (no cast), else None — for checks that must not cast it.
- `compute_weight(linear, dtype)`: that weight cast to `dtype` (differentiable, so a training weight
  gets its gradient back in fp32; no copy when a bf16-stored weight is asked for in bf16), else None.
- `head_weight(head)`: the weight of a bias-free linear output head, plain or bf16-stored, else None.
"""

from __future__ import annotations

import torch


def autocast_bf16(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.bfloat16


def stored_weight(linear) -> torch.Tensor | None:
    """The weight a plain `nn.Linear` or a frozen bf16-stored layer holds, as held (no cast), else None."""
    from tunesmith.adapters.storage import BF16Storage, FrozenLinear

    if type(linear) is torch.nn.Linear:
        return linear.weight
    if type(linear) is FrozenLinear and type(linear.storage) is BF16Storage:
        return linear.storage.data
    return None


def compute_weight(linear, dtype: torch.dtype) -> torch.Tensor | None:
    weight = stored_weight(linear)
    return None if weight is None else weight.to(dtype)


def head_weight(head) -> torch.Tensor | None:
    return None if head is None or head.bias is not None else stored_weight(head)
