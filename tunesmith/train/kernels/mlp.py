"""SwiGLU MLP whose backward keeps two of its four intermediates: a memory saver for training.

Contract: `kernels.prepare` gives every SwiGLU MLP of a family in `kernels.FAMILIES` whose
activation is SiLU (`takes(module)`) — `down(silu(gate(x)) · up(x))` — this file's `fused_forward`.
In it, `silu(g) · u` and the down projection are one autograd node (`SwiGLUDownFn`) when `down_proj`
is a plain `nn.Linear` (full fine-tuning, or a frozen one) or a fusable LoRA layer
(`adapters.fused_lora`); the node saves only `g` and `u` and recomputes `silu(g) · u` in backward.
Under bf16 autocast the node computes in bf16 (a trainable fp32 weight is cast inside the node in
forward and again in backward, so no bf16 copy of it is kept in between; a frozen bf16-stored down
projection is used as stored). A LoRA down projection's dropout masks `h` on the adapter's side only,
its mask kept for backward (`adapters.dropout`). A DoRA down projection at dropout 0 (or in eval) joins
the node too, its output scaled per column as `adapters.fused_dora` does; with dropout > 0 its base
weight reads the dropped `h` as well, so it runs as its own fused DoRA layer after the module's
`silu(gate) · up`. Anything else (qlora's 4-bit base, fp16 autocast) runs the module's own forward.

Why: autograd keeps `g`, `silu(g)`, `u` and `silu(g)·u` — four [tokens × intermediate] tensors per
layer, the largest share of a step's saved activations (4 × 1,536 of ~10,700 floats per token and
layer on SmolLM2). Keeping two cuts a LoRA step's activation memory by about 30% for two cheap
elementwise passes in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.adapters import fused_dora
from tunesmith.adapters.fused_lora import four_bit
from tunesmith.adapters.weights import autocast_bf16, compute_weight
from tunesmith.train.kernels.groups import OWN_OUTPUT, side_by_side
from tunesmith.train.kernels.scratch import scratch


class SwiGLUDownFn(torch.autograd.Function):
    """`y = h Wᵀ + b + s · (h Aᵀ) Bᵀ` with `h = silu(gate) · up`; `lora_a`/`lora_b` may be None. With
    DoRA's `magnitude` and detached `norm` (dropout 0 only), `y = (h Wᵀ + s · (h Aᵀ) Bᵀ) ⊙ m / norm + b`."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float, mask=None, magnitude=None, norm=None):
        h = torch.ops.aten.silu.out(gate, out=scratch("swiglu.h", gate.shape, gate.dtype, gate.device)).mul_(up)
        dora = magnitude is not None
        # a trainable fp32 weight is cast here, and again in backward
        y = F.linear(h, weight.to(h.dtype), None if dora else bias)
        ha = None
        if lora_a is not None:
            ha = F.linear(h if mask is None else mask.kept(h), lora_a)  # LoRA dropout on A's input
            if mask is not None:
                ha.mul_(mask.scale)
            y.view(-1, y.shape[-1]).addmm_(ha.view(-1, ha.shape[-1]), lora_b.t(), alpha=scaling)
        z = scale = None
        if dora:  # z kept for ∂m (adapters.fused_dora)
            z, scale = y.view(-1, y.shape[-1]), magnitude / norm
            y = fused_dora.scaled(z, scale, bias).view(y.shape)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, ha, z, scale, norm)
        ctx.scaling, ctx.into_inputs, ctx.mask = scaling, _group_pair(gate, up), mask
        return y

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, weight, lora_a, lora_b, ha, z, scale, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = ctx.scaling
        g = g_bias = grad_y.reshape(-1, grad_y.shape[-1]).to(gate.dtype)
        grad_m = None
        if z is not None:  # DoRA: the LoRA backward of g ⊙ m / norm
            grad_m, g = fused_dora.dora_backward(g, z, scale, norm, scratch)
        gate2, up2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
        shape, dtype, device = gate2.shape, gate.dtype, gate.device
        silu = torch.ops.aten.silu.out(gate2, out=scratch("swiglu.silu", shape, dtype, device))
        grad_h = torch.mm(g, weight.to(g.dtype), out=scratch("swiglu.grad_h", shape, dtype, device))
        grad_gate = grad_up = grad_w = grad_bias = grad_a = grad_b = g_ha = keep = None
        mask = ctx.mask  # the forward's
        if lora_a is not None:
            g_ha = torch.mm(g, lora_b).mul_(s if mask is None else s * mask.scale)
            if mask is None:
                grad_h.addmm_(g_ha, lora_a)
            else:
                keep = mask.words(grad_h)
                mask.add_kept_(grad_h, g_ha, lora_a, keep)
        if need[2] or need[4]:
            h = torch.mul(silu, up2, out=scratch("swiglu.h", shape, dtype, device))  # silu(g)·u, recomputed
            if need[2]:
                grad_w = torch.mm(g.t(), h).to(weight.dtype)
            if need[4]:
                grad_a = torch.mm(g_ha.t(), h if mask is None else mask.kept(h, keep))
        if need[5]:
            grad_b = torch.mm(g.t(), ha.reshape(-1, ha.shape[-1])).mul_(s)
        if need[3]:
            grad_bias = g_bias.sum(0)
        # ∂up = ∂h·silu(g), ∂gate = silu'(g)·∂h·u. When gate and up lie side by side (a gate/up group's
        # output) nothing needs them after this, so their buffer takes the two gradients in place and
        # the group's backward reads them as one [rows × 2·width] matrix: no fresh tensor, no copy.
        in_place = need[0] and need[1] and ctx.into_inputs
        grad_hu = torch.mul(grad_h, up2, out=scratch("swiglu.h", shape, dtype, device)) if need[0] else None
        if need[1]:
            grad_up = torch.mul(grad_h, silu, out=up2) if in_place else grad_h * silu
            grad_up = grad_up.view(up.shape)
        if need[0]:
            grad_gate = torch.ops.aten.silu_backward.grad_input(
                grad_hu, gate2, grad_input=gate2 if in_place else torch.empty_like(gate2)
            ).view(gate.shape)
        grad_m = grad_m if grad_m is not None and need[8] else None  # a DoRA down projection's magnitude
        return grad_gate, grad_up, grad_w, grad_bias, grad_a, grad_b, None, None, grad_m, None


def _group_pair(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether gate and up are the two halves of a gate/up group's own output (`fused_groups`), which
    nothing but them uses: then the backward may overwrite them with their gradients."""
    base = gate._base
    if base is None or base is not up._base or not getattr(base, OWN_OUTPUT, False):
        return False
    return side_by_side((gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))) is not None


def _operands(down, gate: torch.Tensor) -> tuple | None:
    """(weight, bias, lora_a, lora_b, scaling, dropout mask[, magnitude, norm]) for `SwiGLUDownFn` in
    the dtype it computes in, or None (DoRA with dropout > 0: the layer's own node)."""
    autocast = torch.is_autocast_enabled(gate.device.type)
    if autocast and not autocast_bf16(gate):
        return None
    fused_adapter = getattr(down, "_fused_adapter", None)
    if fused_adapter is not None:
        name = fused_adapter(gate, (), {})
        if name is None or four_bit(down.base_layer) is not None:  # a 4-bit base: the layer's own node decodes it
            return None
        dora = None
        if down.is_dora(name):
            if down.dropout_p(name) > 0:
                return None
            dora = down.dora_operands(name)
        _, weight, bias, lora_a, lora_b = down.fused_operands(name, gate)
        return weight, bias, lora_a, lora_b, down.scaling[name], down.dropout_mask(name), *(dora or ())
    if not autocast:
        if type(down) is torch.nn.Linear and gate.dtype == down.weight.dtype:
            return down.weight, down.bias, None, None, 0.0, None
        return None
    if type(down) is torch.nn.Linear and down.weight.requires_grad:
        weight = down.weight  # cast inside the node: no bf16 copy kept from forward to backward
    else:
        weight = compute_weight(down, torch.bfloat16)
    if weight is None:
        return None
    return weight, None if down.bias is None else down.bias.to(torch.bfloat16), None, None, 0.0, None


def fused_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    operands = _operands(down, gate)
    if operands is None:
        return down(self.act_fn(gate) * up)
    if torch.is_autocast_enabled(gate.device.type):
        gate, up = gate.to(torch.bfloat16), up.to(torch.bfloat16)
    with torch.autocast(gate.device.type, enabled=False):
        return SwiGLUDownFn.apply(gate, up, *operands)


def takes(module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
