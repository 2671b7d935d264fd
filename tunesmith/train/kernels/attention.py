"""Padding-free training: a micro-batch runs as one row of its samples' real tokens, and attention
is computed sample by sample with SDPA's plain causal kernel.

Contract:
- `flatten(rows)` → the collated batch `{input_ids, labels, position_ids}` of shape [1, N], N the
  rows' real tokens (tail padding dropped). Positions restart at 0 at every sample (as `pack`
  made them, and at every row); each row's first label becomes -100, so no token is predicted
  from the row before it — exactly the targets the padded [B, T] layout has.
- `use_varlen(model)` switches a transformers model (PEFT wrappers included) to the attention
  function `varlen_attention`, registered under `VARLEN`; it returns the implementation it
  replaced, for `restore(model, previous)`, or None when the model cannot take it (an architecture
  that does not dispatch through `AttentionInterface`, a sliding window shorter than `max_length`
  — the longest sample — or soft-capped attention): then train with padded batches.
- `varlen_attention` splits every row at its position restarts and runs causal SDPA on each
  segment; with an attention mask, a KV cache or queries shorter than keys it is exactly
  transformers' SDPA attention (which generation needs). On CPU, bf16 segments (autocast) run
  the kernel in fp32 and come back in bf16: PyTorch's CPU flash backward is about twice as slow in
  bf16 as in fp32 at these lengths, and fp32 is the more exact of the two.

Why: padding to the longest sample wastes a quarter of the compute on typical SFT batches, and
transformers' own answer for packed rows (a block-diagonal mask derived from position restarts)
sends SDPA down its masked path, which materialises [heads × T × T] scores per layer — the reason
TRL's padding-free packing is slower and 2.5× bigger on CPU. Per-sample calls keep the fused causal
kernel; on CPU their overhead (one call per sample and layer) is small next to the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.packing import IGNORE, Row

VARLEN = "tunesmith_varlen"
_BOUNDS: tuple = (None, None)  # (position_ids, segments): every layer of a forward shares them


def flatten(rows: list[Row], multiple: int = 1, pad_id: int = 0) -> dict[str, torch.Tensor]:
    ids, labels, pos = [], [], []
    for r in rows:
        n = r.n_real
        ids += r.input_ids[:n]
        labels += [IGNORE] + r.labels[1:n]
        pos += r.position_ids[:n]
    pad = -len(ids) % multiple
    if pad:  # a segment of its own, with no labels: nothing real attends to it or learns from it
        ids += [pad_id] * pad
        labels += [IGNORE] * pad
        pos += range(pad)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
    }


def _segments(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    global _BOUNDS
    if _BOUNDS[0] is position_ids:
        return _BOUNDS[1]
    out = []
    for row in position_ids.expand(batch, -1):
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        ends = starts[1:] + [row.numel()]
        out.append(list(zip(starts, ends)))
    _BOUNDS = (position_ids, out)
    return out


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def flash_forward(q, k, v, out, segments, scale) -> list:
    """The CPU flash kernel per segment of one row: q/k/v/out are [1, heads, N, D] views (GQA: fewer
    k/v heads); writes each segment's output into `out` and returns their log-sum-exps."""
    lses = []
    for s, e in segments:
        o, lse = _FLASH(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.0, True, scale=scale)
        out[:, :, s:e] = o
        lses.append(lse)
    return lses


def flash_backward(grad, q, k, v, out, lses, segments, scale, grads: tuple) -> None:
    """`flash_forward`'s backward, segment by segment, into `grads` = (∂q, ∂k, ∂v), same layout."""
    dq, dk, dv = grads
    for (s, e), lse in zip(segments, lses):
        gq, gk, gv = _FLASH_BACKWARD(
            grad[:, :, s:e], q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], out[:, :, s:e], lse, 0.0, True, scale=scale
        )
        dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = gq, gk, gv


class SegmentFlashFn(torch.autograd.Function):
    """Causal attention per segment of one flattened row on the CPU, as one autograd node: the
    flash kernel's forward and backward per segment, reading and writing whole-row buffers, so
    nothing is concatenated in forward and no per-segment slice gradient (a zeroed row-sized
    tensor each) is built and summed in backward. q [1, H, N, D], k/v [1, KV, N, D] (GQA: the kernel
    shares each k/v head among H/KV query heads) → [1, N, H, D] contiguous, in q's dtype; bf16
    runs the kernel in fp32 (its bf16 backward is ~2× slower at these lengths)."""

    @staticmethod
    def forward(ctx, query, key, value, segments, scale):
        dtype = query.dtype
        work = torch.float32 if dtype == torch.bfloat16 else dtype
        q, k, v = query.to(work), key.to(work), value.to(work)
        n_tokens, heads, dim = q.shape[2], q.shape[1], q.shape[3]
        out = q.new_empty((1, n_tokens, heads, dim))
        lses = flash_forward(q, k, v, out.transpose(1, 2), segments, scale)
        ctx.save_for_backward(q, k, v, out)
        ctx.lses, ctx.segments, ctx.scale, ctx.dtype = lses, segments, scale, dtype
        return out if out.dtype == dtype else out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        grad = grad.to(q.dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flash_backward(
            grad.transpose(1, 2), q, k, v, out.transpose(1, 2), ctx.lses, ctx.segments, ctx.scale, (dq, dk, dv)
        )
        dt = ctx.dtype
        return dq.to(dt), dk.to(dt), dv.to(dt), None, None


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    plain = attention_mask is not None or query.shape[2] != key.shape[2] or query.shape[2] == 1
    if not plain and (position_ids is None or position_ids.shape[-1] != query.shape[2]):
        # plain causal SDPA over a flattened row would let samples attend to each other
        raise RuntimeError(
            f"{type(module).__name__} does not pass position_ids to its attention function; "
            "train with train.padding_free=false"
        )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.device.type == "cpu" and query.shape[0] == 1 and not dropout:
        segments = _segments(position_ids, 1)[0]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return SegmentFlashFn.apply(query, key, value, segments, scale), None
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    if query.device.type == "cpu" and dtype == torch.bfloat16:
        query, key, value = query.float(), key.float(), value.float()
    outs = []
    for b, segments in enumerate(_segments(position_ids, query.shape[0])):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in segments
        ]
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), None


def _inner(model):
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def use_varlen(model, max_length: int | None = None) -> str | None:
    from transformers import AttentionInterface

    inner = _inner(model)
    cfg = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and (max_length is None or window < max_length):  # a window no sample reaches changes nothing
        return None
    if getattr(cfg, "attn_logit_softcapping", None):
        return None
    if not getattr(inner, "_supports_attention_backend", False):
        return None
    AttentionInterface.register(VARLEN, varlen_attention)
    previous = inner.config._attn_implementation
    inner.set_attn_implementation(VARLEN)
    return previous


def is_varlen(model) -> bool:
    return _inner(model).config._attn_implementation == VARLEN


def restore(model, previous: str | None) -> None:
    if previous is not None:
        _inner(model).set_attn_implementation(previous)
