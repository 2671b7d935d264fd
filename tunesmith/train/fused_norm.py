"""RMSNorm as one autograd node that keeps its input and one scalar per token: a training fast path.

Contract: `use_fused_norm(model)` switches every Llama-family RMSNorm of a transformers model
(PEFT wrappers included) — `weight · (x · rsqrt(mean(x²) + eps))`, computed in fp32 — to
`fused_forward`, and returns the modules it switched, for `restore_norm(modules)`. The node
(`RMSNormFn`) saves `x` and the per-token `rsqrt` only, and its backward is the closed form
`∂x = r · (g·w − x̂ · mean(g·w·x̂))`, `∂w = Σ g·x̂` (when the weight trains), in fp32. Outside
autocast the output is exactly transformers' (same operations, same dtype rules; fp64 stays fp64, where transformers rounds to fp32). Under bf16
autocast it comes out in bf16, rounded once from fp32: what every consumer (the q/k/v and
gate/up projections, the head) would cast it to anyway.

Why: transformers' RMSNorm is six elementwise ops whose autograd saves fp32 copies of the
input and of the normalised input per norm (two per layer); under bf16 autocast its fp32
output is then cast to bf16 once per consuming projection — five casts per layer forward, five
casts and sums of gradients in backward, and five separate bf16 copies of the same activations
saved by the five projections. A bf16 output is shared by the projections (saved once per
norm), and the node keeps one input per norm.
"""

from __future__ import annotations

import types

import torch

NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        normed = xf * rstd
        if out_dtype is None:  # transformers' rule: round to the input's dtype, then scale
            out = weight * normed.to(x.dtype)
        else:
            out = normed.mul_(weight).to(out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # a new tensor: x itself when fp32
        g = grad.to(rstd.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        gw = g * weight  # not in place: autograd may share the incoming gradient
        dot = (gw * normed).mean(-1, keepdim=True)
        grad_x = gw.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None, None


def fused_forward(self, x):
    autocast = torch.is_autocast_enabled(x.device.type)
    out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
    with torch.autocast(x.device.type, enabled=False):
        return RMSNormFn.apply(x, self.weight, self.variance_epsilon, out_dtype)


def use_fused_norm(model) -> list:
    switched = []
    for module in model.modules():
        if type(module).__name__ in NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(fused_forward, module)
            switched.append(module)
    return switched


def restore_norm(modules: list) -> None:
    for module in modules:
        if "forward" in vars(module):
            del module.forward
