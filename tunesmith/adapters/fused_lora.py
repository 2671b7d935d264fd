"""PEFT's LoRA linear layer with a fused forward and backward for the training case that matters.

Contract: `FusedLoraLinear` is `peft.tuners.lora.layer.Linear` (same parameters, state-dict keys,
adapter files, merge and unload) whose `forward`, when exactly one plain LoRA adapter is active on
an unmerged `nn.Linear` (or a frozen bf16-stored one, `tunesmith.adapters.storage.BF16Storage`), computes

    y = x Wᵀ + b + s · (d(x) Aᵀ) Bᵀ,   d(x) = x · noise   (LoRA dropout; d(x) = x at dropout 0 or in eval)

in one autograd node (`LoraLinearFn`): the scaled low-rank product is accumulated into the base
output by the GEMM itself (`addmm_`, alpha = s) and, in backward, `∂x = ∂y W + s (∂y B) A` is
one GEMM plus one accumulating GEMM. Dropout's mask (`adapters.dropout`) is named by a seed and
kept for backward as one bit an element, not a dropped copy of `x`. Under bf16 autocast
(`train.precision=bf16`) the node runs wholly in bf16 — input, base weight and adapter cast once,
as autocast would cast them — so the GEMMs hit the CPU's bf16 units (AMX) with no fp32 round
trips; the adapter's gradients come back to its fp32 weights through the casts. Over a 4-bit base
(qlora's NF4 or int4 `FrozenLinear`) the node decodes W itself, in forward and again in backward,
so the graph never holds it. Every other case (several adapters, disabled or merged adapters, DoRA
over a 4-bit base, fp16 autocast) is PEFT's own forward. A DoRA adapter (`adapter.method=dora`)
takes the same path through `adapters.fused_dora.DoraLinearFn` (PEFT's DoRA forward and gradients
in one node).
`apply_method` registers it through PEFT's custom-module hook (`LoraConfig._register_custom_module`).

Why: PEFT's forward is `base(x) + lora_B(lora_A(dropout(x))) * scaling` — per layer an extra
[tokens × out] multiply and add in forward, and their mirror images plus a [tokens × in] gradient
sum in backward, across the ~200 LoRA layers of a small model. On a 2-core CPU those memory-bound
passes cost as much as a fifth of a step; here they ride along inside the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant

from tunesmith.adapters import dropout
from tunesmith.adapters.dropout import Mask
from tunesmith.adapters.fused_dora import DoraLinearFn, row_squares, weight_norm
from tunesmith.adapters.storage import BF16Storage, FrozenLinear, fresh
from tunesmith.adapters.weights import autocast_bf16, compute_weight, stored_weight


class LoraLinearFn(torch.autograd.Function):
    """`weight` is None over a 4-bit base: `frozen` (its `FrozenLinear`) decodes it in forward and
    again in backward, into the layer's decode buffers, so the graph never holds it (as `storage`'s
    own node does)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, mask: Mask | None = None, frozen=None):
        rank = lora_a.shape[0]
        xa = F.linear(x if mask is None else mask.kept(x), lora_a)
        if mask is not None:  # 1/(1 − p) on the [tokens × rank] product, not on the input
            xa.mul_(mask.scale)
        y = F.linear(x, _decoded(weight, frozen, x.dtype), bias)
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, rank), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.mask, ctx.frozen = scaling, mask, frozen
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s, mask = ctx.scaling, ctx.mask
        weight = _decoded(weight, ctx.frozen, x.dtype)
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        g_xa = torch.mm(g, lora_b).mul_(s if mask is None else s * mask.scale)  # [tokens, rank]
        keep = None if mask is None else mask.words(x2)  # the forward's mask
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x = torch.mm(g, weight).addmm_(g_xa, lora_a).view(x.shape)
            else:
                grad_x = mask.add_kept_(torch.mm(g, weight), g_xa, lora_a, keep).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g.t(), x2)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(g_xa.t(), x2 if mask is None else mask.kept(x2, keep))
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.t(), xa.reshape(-1, xa.shape[-1])).mul_(s)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def _decoded(weight: torch.Tensor | None, frozen, dtype: torch.dtype) -> torch.Tensor:
    return weight if frozen is None else frozen.storage.dequantize(dtype, frozen.buffer)


def four_bit(base) -> FrozenLinear | None:
    """`base` when it is a frozen linear stored in 4 bits (qlora's NF4, int4), else None."""
    if type(base) is FrozenLinear and type(base.storage) is not BF16Storage:
        return base
    return None


class FusedLoraLinear(PeftLoraLinear):
    buffer = staticmethod(fresh)  # dropout masks' temporaries (`kernels.prepare`: reused scratch buffers)

    def _fused_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or (name in self.lora_variant and not self.is_dora(name)):
            return None
        if type(self.lora_dropout[name]) not in (torch.nn.Identity, torch.nn.Dropout) or self.fan_in_fan_out:
            return None
        base = self.base_layer
        frozen = four_bit(base)
        if frozen is not None and self.is_dora(name):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return name if autocast_bf16(x) and (frozen is not None or stored_weight(base) is not None) else None
        if type(base) is not torch.nn.Linear and frozen is None:
            return None
        dtypes = {x.dtype, self.lora_A[name].weight.dtype, self.lora_B[name].weight.dtype}
        dtypes.add(frozen.storage.dtype if frozen is not None else base.weight.dtype)
        if self.is_dora(name):
            dtypes.add(self.lora_magnitude_vector[name].weight.dtype)
        return name if len(dtypes) == 1 else None

    def is_dora(self, name: str) -> bool:
        """Whether adapter `name` is PEFT's DoRA (`adapters.fused_dora` computes it)."""
        return type(self.lora_variant.get(name)) is DoraLinearVariant and name in self.lora_magnitude_vector

    def fused_operands(self, name: str, x: torch.Tensor) -> tuple:
        """(x, weight, bias, lora_a, lora_b) in the dtype the fused node computes in; weight is None
        over a 4-bit base (`four_bit`: the node decodes it)."""
        base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
        if not torch.is_autocast_enabled(x.device.type):
            return x, None if four_bit(base) is not None else base.weight, base.bias, a, b
        dt = torch.bfloat16
        bias = None if base.bias is None else base.bias.to(dt)
        return x.to(dt), compute_weight(base, dt), bias, a.to(dt), b.to(dt)

    def dora_operands(self, name: str) -> tuple | None:
        """(magnitude m, detached weight norm n) of a DoRA adapter — n from the weights as they are
        now, as PEFT recomputes it every forward — or None for plain LoRA."""
        if not self.is_dora(name):
            return None
        a, b, weight = self.lora_A[name].weight, self.lora_B[name].weight, stored_weight(self.base_layer)
        norm = weight_norm(weight, a, b, self.scaling[name], self._row_squares(weight, a.dtype))
        return self.lora_magnitude_vector[name].weight, norm

    def _row_squares(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """‖W‖² per row of the frozen base weight, computed once for the weight as it is now (its
        storage and version: a merge or a move recomputes it) — one pass over W a forward saved."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), dtype)
        cached = self.__dict__.get("_tunesmith_row_squares")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_tunesmith_row_squares"] = (key, row_squares(weight, dtype))
        return cached[1]

    def dropout_mask(self, name: str) -> Mask | None:
        """This call's dropout mask for adapter `name` (None in eval mode or at dropout 0)."""
        return dropout.draw(self.dropout_p(name), self.buffer)

    def dropout_p(self, name: str) -> float:
        """The probability adapter `name`'s dropout drops with now (0 in eval mode); draws nothing."""
        return dropout.dropout_p(self.lora_dropout[name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        operands = self.fused_operands(name, x)  # reads the autocast state: before leaving it
        dora = self.dora_operands(name)
        with torch.autocast(x.device.type, enabled=False):
            if dora is None:
                mask = self.dropout_mask(name)
                return LoraLinearFn.apply(*operands, self.scaling[name], mask, four_bit(self.base_layer))
            return DoraLinearFn.apply(*operands, *dora, self.scaling[name], self.dropout_mask(name), self.buffer)
