"""Rotary position embedding inside the per-sample attention node: a training fast path on the CPU.

Contract: `kernels.prepare` gives every attention module of a family in `kernels.FAMILIES` this
file's `fused_forward` (padding-free training only). It takes the padding-free training case — the model on
the CPU under `attention.VARLEN`, one flattened row with its `position_ids`, no attention mask, no
KV cache, no attention dropout — and runs RoPE and the causal attention of every sample as one
autograd node (`RopeSegmentFlashFn`); anything else is the module's own forward. A family with
per-head q/k norms (Qwen3's `q_norm`, `k_norm`) has them applied to q and k before the node, as
transformers applies them before RoPE.

The node reads q/k/v as the projections left them ([1, N, heads × dim], column views of a q/k/v
group's output when `fused_groups` is on), rotates q and k while casting them to the attention's
fp32 (`x·cos + rotate_half(x)·sin` as two multiply-adds per half, in fp32 whatever the input
dtype), runs the CPU flash kernel per sample (`attention.flash_forward`, as `SegmentFlashFn` does), and returns the
output in the input's dtype. For bf16 inputs it keeps those inputs and its bf16 output for the
backward, not the fp32 copies (~2.6 MB less per layer at 600 tokens, ~80 MB on SmolLM2): the backward
rotates and casts them again, and its `Σ ∂o·o` reads the output as rounded to bf16, as GPU flash
kernels do. Its backward rotates ∂q and ∂k back (the transpose of the rotation)
and writes ∂q, ∂k, ∂v side by side into one [1, N, (H + 2·KV) × dim] buffer, which the q/k/v group
takes as its output gradient without a copy.

Why: transformers applies RoPE to bf16 q and k in five elementwise passes (`q·cos`, two slices, a
negation, a `cat`, `·sin`, an add), autograd mirrors them in backward, and the attention node then
casts q, k and v to fp32 and their gradients back: ~2.7 ms per SmolLM2 layer and step at 448
tokens, against ~1.3 ms for the rotation fused into those casts (microbenchmark, forward and
backward). Computing the rotation in fp32 is also more exact than transformers' bf16 one.
"""

from __future__ import annotations

import torch

from tunesmith.train.kernels.attention import VARLEN, _segments, flash_backward, flash_forward
from tunesmith.train.kernels.scratch import scratch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, inverse: bool = False):
    """`out = x·cos + rotate_half(x)·sin` (or its transpose, `inverse`), half by half, computing in
    `out`'s dtype. x, out: [1, N, heads, dim]; cos, sin: [1, N, 1, dim]."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    sign = 1 if inverse else -1
    torch.mul(x1, cos[..., :h], out=o1).addcmul_(x2, sin[..., h:] if inverse else sin[..., :h], value=sign)
    torch.mul(x2, cos[..., h:], out=o2).addcmul_(x1, sin[..., :h] if inverse else sin[..., h:], value=-sign)
    return out


def _operands(query, key, value, cos, sin, work: torch.dtype, reuse: bool):
    """q and k rotated, and v, in the attention's dtype `work`: in reused buffers when they are
    temporaries (`reuse`), else fresh tensors the node may keep (v is `value` itself when it already is one)."""

    def new(tag, like):
        return (
            scratch(tag, like.shape, work, like.device)
            if reuse
            else torch.empty(like.shape, dtype=work, device=like.device)
        )

    q, k = _rotate(query, cos, sin, new("rope.q", query)), _rotate(key, cos, sin, new("rope.k", key))
    v = new("rope.v", value).copy_(value) if reuse else value.to(work, memory_format=torch.contiguous_format)
    return q, k, v


class RopeSegmentFlashFn(torch.autograd.Function):
    """q [1, N, H, D], k/v [1, N, KV, D] (GQA: each k/v head serves H/KV query heads), cos/sin
    [1, N, D] → causal attention per segment of RoPE'd q, k and v: [1, N, H, D] in q's dtype."""

    @staticmethod
    def forward(ctx, query, key, value, cos, sin, segments, scale):
        dtype = query.dtype
        work = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        cos, sin = cos.to(work)[:, :, None], sin.to(work)[:, :, None]
        keep = dtype == work  # fp32 in: q, k, v and out are what the backward keeps; bf16 in: temporaries
        q, k, v = _operands(query, key, value, cos, sin, work, reuse=not keep)
        out = q.new_empty(q.shape) if keep else scratch("rope.out", q.shape, work, q.device)
        lses = flash_forward(*(t.transpose(1, 2) for t in (q, k, v, out)), segments, scale)  # the kernel's layout
        ctx.lses, ctx.segments, ctx.scale, ctx.dtype = lses, segments, scale, dtype
        if keep:
            ctx.save_for_backward(q, k, v, out, cos, sin)
            return out
        # bf16 in: keep the inputs (views of the q/k/v projection's output) and the bf16 output (the o
        # projection keeps it anyway), not their fp32 copies; backward rotates and casts them again
        result = out.to(dtype)
        ctx.save_for_backward(query, key, value, result, cos, sin)
        return result

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, cos, sin = ctx.saved_tensors
        work, dtype, device = cos.dtype, ctx.dtype, q.device
        if dtype != work:  # the same rotation of the same inputs as the forward: the same fp32 q and k
            q, k, v = _operands(q, k, v, cos, sin, work, reuse=True)
            out = scratch("rope.out", out.shape, work, device).copy_(
                out
            )  # rounded to bf16, as flash kernels on GPUs keep it
        if grad.dtype != work:
            grad = scratch("rope.grad", grad.shape, work, device).copy_(grad)
        # the flash gradients are temporaries: rotated back into one fresh buffer below
        dq, dk, dv = (
            scratch(tag, t.shape, work, device) for tag, t in (("rope.dq", q), ("rope.dk", k), ("rope.dv", v))
        )
        flash_backward(
            *(t.transpose(1, 2) for t in (grad, q, k, v, out)),
            ctx.lses,
            ctx.segments,
            ctx.scale,
            tuple(t.transpose(1, 2) for t in (dq, dk, dv)),
        )
        n, heads, kv, dim = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
        joint = torch.empty((1, n, (heads + 2 * kv) * dim), dtype=dtype, device=device)
        gq = joint[..., : heads * dim].view(1, n, heads, dim)
        gk = joint[..., heads * dim : (heads + kv) * dim].view(1, n, kv, dim)
        gv = joint[..., (heads + kv) * dim :].view(1, n, kv, dim)
        if dtype == work:
            _rotate(dq, cos, sin, gq, inverse=True)
            _rotate(dk, cos, sin, gk, inverse=True)
        else:  # rotate back in fp32, round once
            gq.copy_(_rotate(dq, cos, sin, scratch("rope.rq", dq.shape, work, device), inverse=True))
            gk.copy_(_rotate(dk, cos, sin, scratch("rope.rk", dk.shape, work, device), inverse=True))
        gv.copy_(dv)
        return gq, gk, gv, None, None, None, None


def _takes(module, hidden_states, position_embeddings, attention_mask, kwargs) -> bool:
    position_ids = kwargs.get("position_ids")
    return (
        attention_mask is None
        and position_embeddings is not None
        and position_ids is not None
        and kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None
        and hidden_states.device.type == "cpu"
        and hidden_states.shape[0] == 1
        and position_ids.shape[-1] == hidden_states.shape[1]
        and not (module.training and module.attention_dropout)
        and module.config._attn_implementation == VARLEN
        and not position_embeddings[0].requires_grad
        and not position_embeddings[1].requires_grad
    )


def fused_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    if not _takes(self, hidden_states, position_embeddings, attention_mask, kwargs):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    n, dim = hidden_states.shape[1], self.head_dim
    q = self.q_proj(hidden_states).view(1, n, -1, dim)
    k = self.k_proj(hidden_states).view(1, n, -1, dim)
    v = self.v_proj(hidden_states).view(1, n, -1, dim)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm on q and k, before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    if torch.is_autocast_enabled("cpu"):  # the projections' outputs: bf16 under bf16 compute
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    cos, sin = position_embeddings
    segments = _segments(kwargs["position_ids"], 1)[0]
    with torch.autocast("cpu", enabled=False):
        out = RopeSegmentFlashFn.apply(q, k, v, cos, sin, segments, self.scaling)
    return self.o_proj(out.reshape(1, n, -1)), None
