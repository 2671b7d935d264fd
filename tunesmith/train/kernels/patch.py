"""The one way a fast path changes a module: its own instance forward, removed again on restore.

`patch_forward(module, forward)` binds `forward` to that one module instance (the class and every
other instance are untouched); `unpatch(module)` removes it, so the class's forward applies again.
Only `kernels.prepare` (through `Prepared`) calls them.
"""

from __future__ import annotations

import types

import torch


def patch_forward(module: torch.nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)


def unpatch(module: torch.nn.Module) -> None:
    vars(module).pop("forward", None)
