"""Sibling projections that read the same input — an attention layer's q/k/v, a SwiGLU MLP's
gate/up — run as one GEMM: for LoRA over a frozen base with one low-rank pass, and for full
fine-tuning in bf16 without keeping cast weights.

Contract: `group_projections(layers)` takes the projections `kernels.prepare` hands it — an attention
layer's `q_proj`, `k_proj`, `v_proj` or an MLP's `gate_proj`, `up_proj`, for a family in
`kernels.FAMILIES` — and groups them when they are either all fusable LoRA layers
(`adapters.fused_lora`) over frozen plain or bf16-stored weights of one dtype, or all plain
`nn.Linear`s (full fine-tuning); else it returns None. LoRA groups move their frozen weights into
one concatenated buffer (each layer's weight becomes a view of it: no extra memory; `ungroup(groups)`
gives every layer its own weight again and their own forward back). While
switched, the first projection's call computes the whole group in one autograd node and hands each
sibling its output when the sibling is called with the very same input tensor; a call with any
other input, or one the group cannot take, is the layer's own forward.

- LoRA (`GroupLoraFn`), with `W` the stacked weights, `A` the stacked adapters' A and `B` the
  block-diagonal matrix of each adapter's `s·B`:
  `Y = x Wᵀ + b + (x Aᵀ) Bᵀ`, `∂x = ∂Y W + (∂Y B) A`, `∂A = (∂Y B)ᵀ x`, `∂B = ∂Yᵀ (x Aᵀ)`.
  With LoRA dropout each projection's A reads its own dropped copy of `x` (its own mask, kept
  for backward): one rank-r GEMM per projection instead of one for the group.
  DoRA (`adapters.fused_dora`), at dropout 0 or in eval: `Z` as above without `b`, `Y = Z ⊙ r + b`
  with `r` each projection's `m / ‖W + s·BA‖` side by side; the backward is LoRA's with `∂Y ⊙ r`,
  plus `∂m = Σ ∂Y ⊙ Z / ‖…‖` (Z kept). DoRA with dropout > 0 runs the layers one by one (PEFT's DoRA
  applies each projection's base weight to its own dropped input: no shared GEMM is left to group).
  Not taken: several adapters, LoRA and DoRA mixed, merged or disabled adapters (the fused LoRA rules).
- Full fine-tuning (`GroupLinearFn`), under bf16 compute only: `Y = x [W₁; W₂; …]ᵀ + b` with the
  fp32 weights cast inside the node, in forward and again in backward; `∂Wᵢ` come out of one GEMM.
  In fp32 the layers run one by one.
Each projection's output is a column view of `Y`.

Why: per LoRA layer the fused node already makes 2 large and 6 rank-r GEMMs per step; the rank-r
ones are memory-bound and, on a CPU, each call costs ~0.1 ms of fixed overhead — on SmolLM2 in bf16
the ~1,250 rank-16 calls per step took half as long as the large GEMMs. A group of n projections
makes the same 2 large GEMMs (wider, so faster) and 6 rank-r ones instead of 2n and 6n. In full
fine-tuning, autocast keeps a bf16 copy of every weight it casts from the forward to the end of the
backward (~0.14 GiB for SmolLM2's q/k/v/gate/up); recasting costs one more pass over the weights.
"""

from __future__ import annotations

import torch

from tunesmith.adapters import fused_dora
from tunesmith.adapters.fused_lora import FusedLoraLinear
from tunesmith.adapters.storage import BF16Storage, FrozenLinear
from tunesmith.adapters.weights import autocast_bf16, stored_weight
from tunesmith.train.kernels.patch import patch_forward, unpatch
from tunesmith.train.kernels.scratch import scratch

OWN_OUTPUT = "_tunesmith_group_output"  # marks a group's [rows × Σ out] result: only its column views use it


def _split(y: torch.Tensor, sizes: tuple, lead: torch.Size) -> tuple:
    """Each projection's output: a column view of the group's [rows × Σ out] result."""
    setattr(y, OWN_OUTPUT, True)
    return tuple(part.view(*lead, part.shape[-1]) for part in y.split(sizes, dim=1))


def _joined(grads: tuple, sizes: tuple, like: torch.Tensor) -> torch.Tensor:
    """The outputs' gradients side by side, [rows × Σ out], zeros for an unused output. Gradients
    that already lie side by side in one buffer (the SwiGLU node writes ∂gate and ∂up so) are
    taken as they are."""
    rows = like.numel() // like.shape[-1]
    if all(g is not None and g.dtype == like.dtype for g in grads):
        views = [_rows(g, n) for g, n in zip(grads, sizes)]
        together = None if None in views else side_by_side(tuple(views))
        if together is not None:
            return together
    return torch.cat(
        [
            torch.zeros(rows, n, dtype=like.dtype, device=like.device)
            if g is None
            else g.reshape(rows, n).to(like.dtype)
            for g, n in zip(grads, sizes)
        ],
        dim=1,
    )


def side_by_side(parts: tuple) -> torch.Tensor | None:
    """Column blocks of one row-major buffer, in order ([rows × nᵢ] views whose rows are Σ nᵢ apart),
    as the one [rows × Σ nᵢ] matrix they make up; None when they are not."""
    first = parts[0]
    rows, total = first.shape[0], sum(p.shape[1] for p in parts)
    offset = 0
    for p in parts:
        if (
            p.dim() != 2
            or p.shape[0] != rows
            or p.dtype != first.dtype
            or p.stride(1) != 1
            or (rows > 1 and p.stride(0) != total)
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or p.data_ptr() != first.data_ptr() + offset * first.element_size()
        ):
            return None
        offset += p.shape[1]
    return first.as_strided((rows, total), (total, 1))


def _rows(g: torch.Tensor, n: int) -> torch.Tensor | None:
    """[…, n] as a [rows × n] view, or None when its layout does not allow one without a copy."""
    try:
        return g.view(-1, n)
    except RuntimeError:
        return None


class GroupLoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, sizes: tuple, ranks: tuple, masks, magnitude=None, norm=None):
        x2 = x.reshape(-1, x.shape[-1])
        dora = magnitude is not None  # masks is None then: DoRA groups only at dropout 0
        y = torch.mm(x2, weight.t()) if bias is None or dora else torch.addmm(bias, x2, weight.t())
        if masks is None:
            xa = torch.mm(x2, lora_a.t())
        else:  # each projection's own dropout mask on its copy of the input; 1/(1 − p) on the product
            parts = lora_a.split(ranks)
            xa = torch.cat([torch.mm(_kept(x2, m), a.t()) for a, m in zip(parts, masks)], dim=1)
            xa.mul_(_column_scales(masks, ranks, xa))
        y.addmm_(xa, lora_b.t())
        z = scale = None
        if dora:  # Y = Z ⊙ r + b, Z kept for ∂m
            z, scale = y, magnitude / norm
            y = fused_dora.scaled(z, scale, bias)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, z, scale, norm)
        ctx.sizes, ctx.ranks, ctx.masks = sizes, ranks, masks
        return _split(y, sizes, x.shape[:-1])

    @staticmethod
    def backward(ctx, *grads):
        x, weight, lora_a, lora_b, xa, z, scale, norm = ctx.saved_tensors  # weight: frozen (groups are built so)
        g = _joined(grads, ctx.sizes, x)
        need = ctx.needs_input_grad
        g_bias, grad_m = g, None
        if z is not None:  # DoRA: the LoRA backward of g ⊙ r
            grad_m, g = fused_dora.dora_backward(g, z, scale, norm, scratch)
        x2 = x.reshape(g.shape[0], -1)
        g_xa = torch.mm(g, lora_b)
        if ctx.masks is not None:
            g_xa.mul_(_column_scales(ctx.masks, ctx.ranks, g_xa))
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.masks is None:
            if need[0]:
                grad_x = torch.mm(g, weight).addmm_(g_xa, lora_a).view(x.shape)
            if need[3]:
                grad_a = torch.mm(g_xa.t(), x2)
        else:  # the forward's masks (held by each Mask)
            grad_x = torch.mm(g, weight) if need[0] else None
            grads_a = []
            for a, g_part, m in zip(lora_a.split(ctx.ranks), g_xa.split(ctx.ranks, dim=1), ctx.masks):
                keep = None if m is None else m.words(x2)  # unpacked once
                if need[0] and m is None:
                    grad_x.addmm_(g_part, a)
                elif need[0]:
                    m.add_kept_(grad_x, g_part, a, keep)
                if need[3]:
                    grads_a.append(torch.mm(g_part.t(), _kept(x2, m, keep)))
            grad_x = None if grad_x is None else grad_x.view(x.shape)
            grad_a = torch.cat(grads_a) if need[3] else None
        if need[2]:
            grad_bias = g_bias.sum(0)
        if need[4]:
            grad_b = torch.mm(g.t(), xa)
        grad_m = grad_m if grad_m is not None and need[8] else None  # a DoRA group's magnitudes
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, grad_m, None


def _kept(x2: torch.Tensor, mask, keep: torch.Tensor | None = None) -> torch.Tensor:
    """`x2` with `mask`'s dropped elements zeroed (not yet scaled), in a reused buffer (valid until
    the next projection's)."""
    return x2 if mask is None else mask.kept(x2, keep)


def _column_scales(masks: tuple, ranks: tuple, like: torch.Tensor) -> torch.Tensor:
    """Each projection's 1/(1 − p) over its `rank` columns of a [tokens × Σ rank] product (1 without dropout)."""
    scales = [1.0 if m is None else m.scale for m in masks]
    return torch.tensor(scales, dtype=like.dtype).repeat_interleave(torch.tensor(ranks)).to(like.device)


class GroupLinearFn(torch.autograd.Function):
    """`Y = x [W₁; W₂; …]ᵀ + b` for trainable weights, computed in `dtype` (bf16): each weight is cast
    inside the node, in forward and again in backward, so no cast copy is kept between the two —
    autocast would keep one bf16 copy of every weight from the forward to the end of the backward."""

    @staticmethod
    def forward(ctx, x, bias, dtype, *weights):
        x2 = x.reshape(-1, x.shape[-1])
        w = torch.cat([wi.to(dtype) for wi in weights])
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        ctx.save_for_backward(x, *weights)
        ctx.dtype, ctx.sizes = dtype, tuple(wi.shape[0] for wi in weights)
        return _split(y, ctx.sizes, x.shape[:-1])

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        g = _joined(grads, ctx.sizes, x)
        need = ctx.needs_input_grad
        grad_x = grad_bias = None
        if need[0]:
            grad_x = torch.mm(g, torch.cat([wi.to(ctx.dtype) for wi in weights])).view(x.shape)
        if need[1]:
            grad_bias = g.sum(0)
        grad_ws = [None] * len(weights)
        if any(need[3:]):
            parts = torch.mm(g.t(), x2).split(ctx.sizes, dim=0)
            grad_ws = [p.to(wi.dtype) if n else None for p, wi, n in zip(parts, weights, need[3:])]
        return (grad_x, grad_bias, None, *grad_ws)


class ProjectionGroup:
    """Projections sharing an input. LoRA layers: `weight` holds their frozen weights stacked (theirs
    are views of it). Plain trainable linears (full fine-tuning): `weight` is None; they group under
    bf16 compute only, where the node's own casts replace autocast's kept copies."""

    def __init__(self, layers: list):
        self.layers = layers
        self.lora = type(layers[0]) is FusedLoraLinear
        bases = [layer.base_layer if self.lora else layer for layer in layers]
        self.sizes = tuple(b.out_features for b in bases)
        self.weight = torch.cat([stored_weight(b) for b in bases]) if self.lora else None
        if self.lora:
            for base, view in zip(bases, self.weight.split(self.sizes)):
                _set_stored(base, view)
        self.stash = None  # (input, outputs) between the first projection's call and its siblings'

    def run(self, x: torch.Tensor) -> tuple | None:
        if not self.lora:
            return self._run_linear(x)
        names = [layer._fused_adapter(x, (), {}) for layer in self.layers]
        if None in names:
            return None
        doras = [layer.is_dora(n) for layer, n in zip(self.layers, names)]
        if any(doras) and (not all(doras) or any(layer.dropout_p(n) > 0 for layer, n in zip(self.layers, names))):
            return None  # DoRA groups at dropout 0 only (before any mask is drawn: the layers draw them)
        magnitude = norm = None
        if all(doras):
            dora = [layer.dora_operands(n) for layer, n in zip(self.layers, names)]
            magnitude, norm = torch.cat([m for m, _ in dora]), torch.cat([n for _, n in dora])
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.bfloat16 if autocast else x.dtype
        lora_a = torch.cat([layer.lora_A[n].weight for layer, n in zip(self.layers, names)]).to(dtype)
        lora_b = torch.block_diag(
            *[layer.lora_B[n].weight * layer.scaling[n] for layer, n in zip(self.layers, names)]
        ).to(dtype)
        bias = self._bias([layer.base_layer.bias for layer in self.layers])
        masks = [layer.dropout_mask(n) for layer, n in zip(self.layers, names)]  # drawn in the layers' order
        ranks = tuple(layer.lora_A[n].weight.shape[0] for layer, n in zip(self.layers, names))
        with torch.autocast(x.device.type, enabled=False):
            return GroupLoraFn.apply(
                x.to(dtype),
                self.weight.to(dtype),
                None if bias is None else bias.to(dtype),
                lora_a,
                lora_b,
                self.sizes,
                ranks,
                None if all(m is None for m in masks) else tuple(masks),
                magnitude,
                norm,
            )

    def _run_linear(self, x: torch.Tensor) -> tuple | None:
        if not autocast_bf16(x):
            return None
        bias = self._bias([layer.bias for layer in self.layers])
        with torch.autocast(x.device.type, enabled=False):
            return GroupLinearFn.apply(
                x.to(torch.bfloat16), bias, torch.bfloat16, *[layer.weight for layer in self.layers]
            )

    def _bias(self, biases: list) -> torch.Tensor | None:
        """The layers' biases stacked (zeros for a layer without one), or None when none has one."""
        if all(b is None for b in biases):
            return None
        like = next(b for b in biases if b is not None)
        return torch.cat([like.new_zeros(n) if b is None else b for b, n in zip(biases, self.sizes)])


def _set_stored(base, weight: torch.Tensor) -> None:
    if type(base) is FrozenLinear:
        base.storage.data = weight
    else:
        base.weight.data = weight


def grouped_forward(self, x, *args, **kwargs):
    group, index = self._tunesmith_group
    if not args and not kwargs:
        if index == 0:
            outputs = group.run(x)
            if outputs is not None:
                group.stash = (x, outputs)
                return outputs[0]
        elif group.stash is not None and group.stash[0] is x:
            outputs = group.stash[1]
            if index == len(outputs) - 1:
                group.stash = None
            return outputs[index]
    return type(self).forward(self, x, *args, **kwargs)


def _groupable(layers: list) -> bool:
    if all(type(layer) is torch.nn.Linear for layer in layers):  # full fine-tuning
        return len({(layer.weight.dtype, layer.weight.device, layer.in_features) for layer in layers}) == 1
    if not all(type(layer) is FusedLoraLinear for layer in layers):
        return False
    bases = [layer.base_layer for layer in layers]
    weights = [stored_weight(b) for b in bases]
    if any(w is None or w.requires_grad for w in weights):
        return False
    if any(type(b) is FrozenLinear and type(b.storage) is not BF16Storage for b in bases):
        return False
    if any(b.bias is not None and b.bias.requires_grad for b in bases):
        return False
    return len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1


def group_projections(layers: list) -> ProjectionGroup | None:
    """Group `layers` (the projections of one module that read the same input), or None."""
    if not _groupable(layers):
        return None
    group = ProjectionGroup(layers)
    for index, layer in enumerate(layers):
        layer._tunesmith_group = (group, index)
        patch_forward(layer, grouped_forward)
    return group


def copies_out(groups: list) -> bool:
    """Whether `leave_the_file` copies the frozen weights out of the model file: a LoRA group over
    plain weights (`tunesmith fit` counts the file's pages beside the copies)."""
    return any(group.lora and type(group.layers[0].base_layer) is torch.nn.Linear for group in groups)


def leave_the_file(model, groups: list) -> None:
    """For LoRA groups over plain weights, copy every other frozen weight out of the model file.
    transformers maps a safetensors file whose dtype is the load dtype into memory and hands out
    views of it; one such view left alive
    keeps the whole mapping, so the file's pages of the weights just stacked into a group would
    stay resident beside the stack (+0.3 GiB on SmolLM2 in fp32). Once nothing points into the
    mapping it is unmapped; the copies cost what the mapped pages did."""
    if not copies_out(groups):
        return
    stacked = {group.weight.untyped_storage().data_ptr() for group in groups if group.weight is not None}
    for param in model.parameters():
        if not param.requires_grad and param.untyped_storage().data_ptr() not in stacked:
            param.data = param.data.clone()


def ungroup(groups: list) -> None:
    for group in groups:
        for layer in group.layers:
            unpatch(layer)
            vars(layer).pop("_tunesmith_group", None)
            if group.lora:
                _set_stored(layer.base_layer, stored_weight(layer.base_layer).clone())
        group.weight, group.stash = None, None
