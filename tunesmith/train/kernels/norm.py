"""RMSNorm as one autograd node that keeps its input and one scalar per token: a training fast path.

Contract: `kernels.prepare` gives every RMSNorm of a family in `kernels.FAMILIES` (`takes(module)`)
— `weight · (x · rsqrt(mean(x²) + eps))`, computed in fp32 — this file's `fused_forward`. The node
(`RMSNormFn`) saves `x` and the per-token `rsqrt` only, and its backward is the closed form
`∂x = r · (g·w − x̂ · mean(g·w·x̂))`, `∂w = Σ g·x̂` (when the weight trains), in fp32. Outside
autocast the output is exactly transformers' (same operations, same dtype rules; fp64 stays fp64,
where transformers rounds to fp32). Under bf16
autocast it comes out in bf16, rounded once from fp32: what every consumer (the q/k/v and
gate/up projections, the head) would cast it to anyway.

Why: transformers' RMSNorm is six elementwise ops whose autograd saves fp32 copies of the
input and of the normalised input per norm (two per layer); under bf16 autocast its fp32
output is then cast to bf16 once per consuming projection — five casts per layer forward, five
casts and sums of gradients in backward, and five separate bf16 copies of the same activations
saved by the five projections. A bf16 output is shared by the projections (saved once per
norm), and the node keeps one input per norm. Its fp32 temporaries (the cast input, its square,
the normalised input, the gradient's products) live in reused buffers (`train.scratch`): at a
600-token row each is 1.4 MB, above the 1 MiB mmap threshold `tunesmith train` pins, so fresh
ones faulted in ~25K pages per bf16 LoRA step.
"""

from __future__ import annotations

import torch

from tunesmith.train.kernels.scratch import scratch


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype):
        ft = torch.promote_types(x.dtype, torch.float32)
        xf = x if x.dtype == ft else _buf("x", x, ft).copy_(x)
        rstd = torch.pow(xf, 2, out=_buf("sq", x, ft)).mean(-1, keepdim=True).add_(eps).rsqrt_()
        normed = torch.mul(xf, rstd, out=_buf("n", x, ft))
        if out_dtype is None:  # transformers' rule: round to the input's dtype, then scale
            out = weight * normed.to(x.dtype)
        else:
            out = normed.mul_(weight).to(out_dtype, copy=True)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        ft = rstd.dtype
        normed = _buf("n", x, ft).copy_(x).mul_(rstd)
        g = grad if grad.dtype == ft else _buf("g", grad, ft).copy_(grad)  # autograd may share `grad`: read only
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mul(g, normed, out=_buf("gn", x, ft)).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        # an fp32 input's gradient is this very tensor, so it cannot live in a reused buffer
        gw = g * weight if x.dtype == ft else torch.mul(g, weight, out=_buf("gw", x, ft))
        dot = torch.mul(gw, normed, out=_buf("gn", x, ft)).mean(-1, keepdim=True)
        grad_x = gw.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None, None


def _buf(tag: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A reused fp32 buffer shaped like `like` for the node's temporaries (`train.scratch`)."""
    return scratch("norm." + tag, like.shape, dtype, like.device)


def fused_forward(self, x):
    autocast = torch.is_autocast_enabled(x.device.type)
    out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
    with torch.autocast(x.device.type, enabled=False):
        return RMSNormFn.apply(x, self.weight, self.variance_epsilon, out_dtype)


def takes(module) -> bool:
    return hasattr(module, "variance_epsilon") and hasattr(module, "weight")
