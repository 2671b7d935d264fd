"""PEFT's DoRA in one autograd node: the fused LoRA layer's forward and backward with DoRA's magnitude.

Contract: for one DoRA adapter (`adapter.method=dora`) on an unmerged linear layer, `DoraLinearFn`
computes what PEFT 0.21's `DoraLinearVariant.forward` computes, and the same gradients for `x`, `A`,
`B` and the magnitude vector `m` (the base weight is frozen):

    n = ‖W + s·BA‖ (per output row, recomputed every forward, detached: no gradient flows through it)
    r = m / n
    dropout 0 or eval:  y = r ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b
    LoRA dropout d(x):  y = x Wᵀ + b + (r − 1) ⊙ d(x) Wᵀ + r ⊙ s (d(x) Aᵀ) Bᵀ

(PEFT at dropout > 0 computes the base part a second time on the dropped input; so does the node,
with the mask named by a seed and kept as bits, `adapters.dropout`.) With `z` the un-scaled sum in
parentheses (under dropout `d(x) Wᵀ + s (d(x) Aᵀ) Bᵀ`) and `g = ∂y`: `∂m = Σ_tokens g ⊙ z / n`, and
the rest is the LoRA backward with `g' = r ⊙ g` — `∂x = g' W + s (g' B) A` (under dropout
`g W + d(((r − 1) ⊙ g) W + s (g' B) A)`),
`∂A = s (g' B)ᵀ d(x)`, `∂B = s g'ᵀ (d(x) Aᵀ)`, `∂b = Σ g`. The node keeps `z` for `∂m` — one
[tokens × out] tensor; PEFT's forward keeps two (its base and LoRA results).

`weight_norm` is PEFT's `get_weight_norm` expanded (‖W‖² + cross terms: the same norm within fp32
rounding, for two reads of W); under bf16 autocast it is computed in fp32 from the weight as
stored. `scaled` and `dora_backward` are the pieces the grouped q/k/v, gate/up and SwiGLU+down nodes (`train.kernels`)
reuse at dropout 0, where DoRA is LoRA's node plus a column scale: they take `z` as those nodes
compute it and return `y`, and `(∂m, g')`.

Why: PEFT's DoRA forward per layer makes the LoRA product through an identity matrix, the base output
twice over, and five [tokens × out] elementwise passes with their mirror images in backward, each a
separate autograd node — on a 2-core CPU DoRA trained at 0.55–0.67× LoRA's tokens/s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.adapters.dropout import Mask
from tunesmith.adapters.storage import fresh


def weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖W + s·BA‖ per output row, detached, in the adapter's dtype (fp32 for a bf16-stored weight), as
    ‖W‖² + 2s·⟨B, W Aᵀ⟩ + s²·⟨B, B (A Aᵀ)⟩ row by row: W is read once or twice and nothing of its
    size is written (PEFT builds BA through an identity matrix and materialises W + s·BA: ~7 passes
    over every weight per forward, which also dominates an evaluation forward of a short sample).
    `squares` is ‖W‖² per row (`row_squares`) when the caller keeps it: W is frozen."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        dt = lora_a.dtype
        wa = F.linear(weight, lora_a.to(weight.dtype)).to(dt)  # W Aᵀ, [out × r]
        cross = wa.mul_(2 * scaling).add_(lora_b @ (lora_a @ lora_a.t()), alpha=scaling * scaling)
        squares = row_squares(weight, dt) if squares is None else squares.clone()
        return squares.add_((lora_b * cross).sum(1)).clamp_min_(0).sqrt_()


def row_squares(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W‖² per output row in `dtype`, accumulated in fp32 or wider."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square_()


def scaled(z2: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`y = z ⊙ r + b` for [rows × out] `z`, in `z`'s dtype (`times`: no fp32 copy of a bf16 `z`)."""
    y = times(z2, scale, torch.empty_like(z2))
    return y if bias is None else y.add_(bias)


def dora_backward(g2: torch.Tensor, z2: torch.Tensor, scale: torch.Tensor, norm: torch.Tensor, buffer=fresh) -> tuple:
    """(∂m, g ⊙ r) from the output gradient `g` and the un-scaled output `z` ([rows × out] both). The
    products g ⊙ z and g ⊙ r are temporaries in `buffer("dora.gz" | "dora.g", …)`: the caller's
    backward uses g ⊙ r and lets it go. For bf16 `g`, ∂m is summed over tokens in fp32 and rounded
    to bf16 once before it is widened (an fp32 sum of a bf16 tensor converts it whole first)."""
    products = torch.mul(g2, z2, out=buffer("dora.gz", g2.shape, g2.dtype, g2.device))
    grad_m = products.sum(0).to(norm.dtype).div_(norm)
    return grad_m, times(g2, scale, buffer("dora.g", g2.shape, g2.dtype, g2.device))


def times(t: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = t ⊙ r` for [rows × n] `t` and per-column `r`. A bf16 `t` with an fp32 `r` is multiplied
    by r's leading bf16 part and then by the rest (`r = hi + lo`, both bf16), so the product carries
    fp32 r to within bf16 rounding of the result. Why: torch's CPU kernels given a bf16 and an fp32
    operand convert the bf16 one into a fresh fp32 tensor, and a fresh tensor above 1 MiB faults in
    its every page: a [2,000 × 1,536] multiply took 10.5 ms that way, 0.6 ms like this."""
    if t.dtype == r.dtype:
        return torch.mul(t, r, out=out)
    hi = r.to(t.dtype)
    lo = (r - hi.to(r.dtype)).to(t.dtype)
    return torch.mul(t, hi, out=out).addcmul_(t, lo)


class DoraLinearFn(torch.autograd.Function):
    """`y` as in the module docstring; `norm` comes from `weight_norm` (no gradient), `mask` is LoRA
    dropout's (None at dropout 0 or in eval)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_a, lora_b, magnitude, norm, scaling: float, mask: Mask | None = None, buffer=fresh
    ):
        x2 = x.reshape(-1, x.shape[-1])
        scale = magnitude / norm
        xd = x2 if mask is None else mask.dropped(x2)
        xa = torch.mm(xd, lora_a.t())
        z = torch.mm(xd, weight.t())  # W d(x)
        if mask is None:
            y = scaled(z.addmm_(xa, lora_b.t(), alpha=scaling), scale, bias)
        else:  # x Wᵀ + b − d(x) Wᵀ + r ⊙ (d(x) Wᵀ + s d(x) Aᵀ Bᵀ)
            y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
            y.sub_(z).addcmul_(z.addmm_(xa, lora_b.t(), alpha=scaling), scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, z, scale, norm)
        ctx.scaling, ctx.mask, ctx.buffer = scaling, mask, buffer
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, xa, z, scale, norm = ctx.saved_tensors
        s, mask = ctx.scaling, ctx.mask
        need = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        grad_m, g_r = dora_backward(g, z, scale, norm, ctx.buffer)
        g_xa = torch.mm(g_r, lora_b).mul_(s)  # [tokens, rank]
        grad_x = grad_a = grad_b = grad_bias = None
        if need[0]:
            if mask is None:
                grad_x = torch.mm(g_r, weight).addmm_(g_xa, lora_a)
            else:  # ∂ through x Wᵀ, plus the dropped path: ((r − 1) ⊙ g) W + s (g' B) A
                inner = torch.mm(torch.mul(g, scale - 1, out=torch.empty_like(g)), weight).addmm_(g_xa, lora_a)
                grad_x = torch.mm(g, weight).add_(mask.drop_(inner))
            grad_x = grad_x.view(x.shape)
        if need[3]:
            grad_a = torch.mm(g_xa.t(), x2 if mask is None else mask.dropped(x2))
        if need[4]:
            grad_b = torch.mm(g_r.t(), xa).mul_(s)
        if need[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m if need[5] else None, None, None, None, None
