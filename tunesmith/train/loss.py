"""Next-token loss computed only where there are labels.

Contract: `token_loss(model, input_ids, labels, position_ids)` returns `(loss_sum, n_tokens)`:
the summed cross-entropy over every position whose *next* label is not -100, and how many
such positions there were. Callers divide by the token count of the whole optimizer step,
so packed and unpacked batches, and any gradient-accumulation split, give the same gradient.

Why not `model(labels=...)`: the LM head is a vocab-sized matmul (a fifth of SmolLM2's
FLOPs). With answer-only SFT most positions carry no label, so we run the backbone, pick
the labelled hidden states, and apply the head to those alone, in checkpointed chunks so
the fp32 logits never exist for the whole batch at once. Models whose head does more than
a matmul (logit soft-capping, scaling) take the plain full-logits path.

With a plain `nn.Linear` head, `LinearCrossEntropy` does the head, the loss and their gradients
in one pass over chunks of `CHUNK` rows: each chunk's logits turn into softmax − one-hot in place,
which gives ∂hidden (and ∂W when the head trains) right away, so the backward only scales what
the forward left. No logits outlive their chunk and nothing is recomputed. In bf16 on a CPU the
rows are padded with zero rows to `compute.gemm_rows_multiple` (their loss and gradient rows are
dropped), so the head's GEMMs keep one fast shape. Other heads (qlora's
NF4-quantized embeddings) go through `checkpoint`ed chunks of `MODULE_CHUNK` rows of the module.

Each sample's first label must be -100 (the packer guarantees it): in a packed row the
position before a sample's first token belongs to the previous sample.

Soft targets (`data.replay_loss: kl`, `train/replay_kl.py`): a label ≤ `SOFT` is no token but row
`SOFT − label` of `LossModule.soft = (ids [N, k], p [N, k], rest [N])`, the base model's top-k
next-token probabilities and the mass of all other tokens. Such a position's loss is the
cross-entropy against those k + 1 buckets, −Σⱼ pⱼ log qⱼ − rest · log(1 − Σⱼ qⱼ): KL(base ‖ model)
over the buckets plus the base's own entropy, so its gradient vanishes where the model still is
the base. A hard label is the same with p = (1, 0, …) and rest 0, so one chunk may mix both.

`LossModule(model, embed_into_grad=True)` (full fine-tuning in one process) looks the input
embeddings up through `EmbedIntoGrad`, whose backward adds the gradients of the rows it read
into `weight.grad` in place. Autograd's own embedding backward builds a zeroed vocab × hidden
gradient and, with tied input/output embeddings, adds it to the head's: two passes over a 113 MB
matrix per micro-batch on SmolLM2, a tenth of a CPU step. Not under DDP/FSDP, whose gradient
hooks must see every contribution to a parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.adapters.weights import autocast_bf16, head_weight
from tunesmith.precision import gemm_rows_multiple
from tunesmith.train.kernels.scratch import release, scratch

IGNORE = -100
SOFT = -1000  # labels ≤ SOFT index soft targets (module doc)
CHUNK = 256  # rows of logits at a time: 256 × 49,152 fp32 is 48 MiB on SmolLM2
MODULE_CHUNK = 2048  # other heads: checkpointed chunks (recomputed in backward), so fewer and bigger


class LossModule(torch.nn.Module):
    """`token_loss` as a module, so DDP can wrap it: DDP only syncs gradients of work done
    inside its own forward, and this loss calls the decoder rather than `model.forward`."""

    def __init__(self, model, embed_into_grad: bool = False):
        super().__init__()
        self.model = model
        self.embed_into_grad = embed_into_grad
        self.soft = None  # (ids, p, rest): the soft targets labels ≤ SOFT point at (module doc)

    def forward(self, input_ids, labels, position_ids=None):
        return token_loss(self.model, input_ids, labels, position_ids, self.embed_into_grad, self.soft)


class EmbedIntoGrad(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose backward index-adds into `weight.grad` (created if None)
    instead of returning a dense gradient; must run outside DDP/FSDP (see the module doc).

    The weight comes in a tuple, so autograd draws no edge from this node to it: with tied
    embeddings the head's gradient then lands in `weight.grad` at the start of the backward (as
    the buffer itself, no copy), and the rows read here are added into it later. With an edge,
    the weight's gradient would wait for this node: a zeroed vocab × hidden buffer here, the head's
    own buffer beside it, and a sum of the two. `anchor` (a scalar that requires grad) keeps the
    node in the graph."""

    @staticmethod
    def forward(ctx, ids, anchor, boxed_weight, padding_idx):
        (weight,) = boxed_weight
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight.detach(), padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.grad.dtype)
        if ctx.padding_idx is not None:  # nn.Embedding never trains its padding row
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        weight.grad.index_add_(0, ids, grad)
        return None, None, None, None


def lookup_into_grad(ids, embedding):
    anchor = torch.zeros((), device=ids.device, requires_grad=True)
    return EmbedIntoGrad.apply(ids, anchor, (embedding.weight,), embedding.padding_idx)


def can_embed_into_grad(model) -> bool:
    """A plain, trainable `nn.Embedding` input layer (no scaling or max_norm)."""
    emb = unwrap(model).get_input_embeddings()
    return type(emb) is torch.nn.Embedding and emb.weight.requires_grad and emb.max_norm is None and not emb.sparse


def unwrap(model):
    """The underlying transformers model behind PEFT wrappers (layers stay shared)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def plain_head(model) -> bool:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    special = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")
    return all(getattr(text_cfg, k, None) in (None, 1, 1.0) for k in special)


def _ce_sum(head, hidden, targets, soft=None):
    logits = head(hidden).float()
    return soft_ce_sum(logits, soft) if soft is not None else F.cross_entropy(logits, targets, reduction="sum")


def row_targets(targets, soft):
    """Per row (ids [n, k], p [n, k], rest [n]): a hard target t as (t, t, …) with p = (1, 0, …) and
    rest 0, a soft one (label ≤ SOFT) as its row of the table `soft`."""
    ids, p, rest = soft
    k = ids.shape[1]
    hard = targets > SOFT
    index = (SOFT - targets).clamp_min(0)
    row_ids = torch.where(hard[:, None], targets[:, None].expand(-1, k), ids[index].long())
    one_hot = torch.zeros(k, dtype=p.dtype, device=p.device)
    one_hot[0] = 1.0
    row_p = torch.where(hard[:, None], one_hot, p[index])
    row_rest = torch.where(hard, torch.zeros((), dtype=rest.dtype, device=rest.device), rest[index])
    return row_ids, row_p, row_rest


def soft_ce_sum(logits, soft):
    """Σ over rows of −Σⱼ pⱼ log qⱼ − rest · log(1 − Σⱼ qⱼ), q = softmax(logits) (fp32 logits)."""
    ids, p, rest = soft
    logq = torch.log_softmax(logits, dim=-1).gather(1, ids)
    q_rest = (1.0 - logq.exp().sum(1)).clamp_min(1e-12)
    return -(p * logq).sum() - (rest * q_rest.log()).sum()


def _logits(hidden, weight, out):
    return torch.mm(hidden, weight.t(), out=out)


class LinearCrossEntropy(torch.autograd.Function):
    """`cross_entropy(hidden @ weightᵀ, targets, reduction="sum")`, chunked, with its gradients
    computed during the forward (see the module doc). ∂W is summed over chunks into one buffer."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype=None, soft=None):
        """`soft`: per row (ids, p, rest) from `row_targets`, in place of `targets` (module doc)."""
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = dtype or hidden.dtype  # the GEMMs' dtype; logits, softmax and the loss are fp32
        w = weight.detach().to(cdt)  # one cast for every chunk (none when the dtypes agree)
        rows, in_dtype = hidden.shape[0], hidden.dtype
        pad = -rows % gemm_rows_multiple(cdt, hidden.device)  # zero rows that take no part in anything
        if pad:
            hidden = torch.cat([hidden.detach().to(cdt), hidden.new_zeros((pad, hidden.shape[1]), dtype=cdt)])
            targets = torch.cat([targets, targets.new_zeros(pad)])
            if soft is not None:
                soft = tuple(torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in soft)
        grad_h = torch.empty((rows, hidden.shape[1]), dtype=in_dtype, device=hidden.device) if want_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, CHUNK):  # a chunk past the real rows would be padding only
            h, t = hidden[start : start + CHUNK].to(cdt), targets[start : start + CHUNK]
            real = min(len(t), rows - start)
            shape = (len(t), w.shape[0])
            # the logits, their softmax and its cast live in reused buffers (`scratch`): tens of MB
            logits = _logits(h, w, scratch("loss.logits", shape, cdt, h.device))
            probs = (
                logits if cdt == torch.float32 else scratch("loss.fp32", shape, torch.float32, h.device).copy_(logits)
            )
            if soft is not None:
                ids, p, rest = (x[start : start + CHUNK] for x in soft)
                z_top = probs.gather(1, ids)
                target_logits = (z_top * p).sum(1)
            else:
                target_logits = probs.gather(1, t[:, None]).squeeze(1)
            top = probs.amax(dim=1, keepdim=True)
            sums = probs.sub_(top).exp_().sum(dim=1, keepdim=True)  # exp(z − max), in place
            lse = top.squeeze(1) + sums.log().squeeze(1)
            if soft is not None:
                q_top = z_top.sub_(lse[:, None]).exp_()
                q_rest = (1.0 - q_top.sum(1)).clamp_min(1e-12)  # hard rows: rest is 0, q_rest unused
                total += (lse * (1.0 - rest) - target_logits - rest * q_rest.log())[:real].sum()
            else:
                total += (lse - target_logits)[:real].sum()
            if not (want_h or want_w):
                continue
            probs.div_(sums)  # softmax
            if soft is not None:  # ∂/∂z: q − p on the k ids, q · (1 − rest / q_rest) on every other
                keep_rest = 1.0 - rest / q_rest
                probs.mul_(keep_rest[:, None]).scatter_add_(1, ids, q_top * (1.0 - keep_rest)[:, None] - p)
            else:
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # ∂loss/∂logits
            probs[real:] = 0.0
            if probs is not logits:
                probs = logits.copy_(probs)
            if want_h:
                if cdt == grad_h.dtype and real == len(t):
                    torch.mm(probs, w, out=grad_h[start : start + CHUNK])
                else:
                    grad_h[start : start + real] = torch.mm(probs, w)[:real]
            if want_w:
                if grad_w is None:
                    grad_w = torch.mm(probs.t(), h).to(weight.dtype)
                elif cdt == grad_w.dtype:
                    grad_w.addmm_(probs.t(), h)
                else:
                    grad_w.add_(torch.mm(probs.t(), h))
        if want_w:  # a trained head: the run's peak is weights, gradients and optimizer state; keep nothing
            release("loss.logits", "loss.fp32")
        ctx.grads = (grad_h, grad_w)  # intermediates, not inputs or outputs: kept on ctx
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("LinearCrossEntropy: its gradients were computed for one backward pass only")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # scaled in place and handed over: no second copy of ∂W
        scale = grad.to(grad_h.dtype if grad_h is not None else grad_w.dtype)
        return (
            grad_h.mul_(scale) if grad_h is not None else None,
            grad_w.mul_(scale) if grad_w is not None else None,
            None,
            None,
            None,
        )


def token_loss(model, input_ids, labels, position_ids=None, embed_into_grad: bool = False, soft=None):
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n_tokens = int(keep.sum())
    inner = unwrap(model)
    inputs = {"input_ids": input_ids}
    if embed_into_grad and torch.is_grad_enabled():
        inputs = {"inputs_embeds": lookup_into_grad(input_ids, inner.get_input_embeddings())}
    if not plain_head(inner) or not hasattr(inner, "get_decoder"):
        out = model(**inputs, position_ids=position_ids, use_cache=False)
        logits = out.logits[:, :-1][keep].float()
        rows = _soft_rows(targets[keep], soft)
        if rows is not None:
            return soft_ce_sum(logits, rows), n_tokens
        return F.cross_entropy(logits, targets[keep], reduction="sum"), n_tokens
    hidden = inner.get_decoder()(**inputs, position_ids=position_ids, use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1][keep]
    targets = targets[keep]
    rows = _soft_rows(targets, soft)
    head = inner.get_output_embeddings()
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    weight = head_weight(head)
    if weight is not None:
        dtype = torch.bfloat16 if autocast_bf16(hidden) else None
        with torch.autocast(hidden.device.type, enabled=False):
            return LinearCrossEntropy.apply(hidden, weight, targets, dtype, rows), n_tokens
    if n_tokens <= MODULE_CHUNK or not torch.is_grad_enabled():
        return _ce_sum(head, hidden, targets, rows), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, MODULE_CHUNK):
        end = start + MODULE_CHUNK
        part = None if rows is None else tuple(x[start:end] for x in rows)
        total = total + checkpoint(_ce_sum, head, hidden[start:end], targets[start:end], part, use_reentrant=False)
    return total, n_tokens


def _soft_rows(targets, soft):
    """`row_targets` when this batch has a soft label, else None (the plain hard-label path)."""
    if soft is None or not bool((targets <= SOFT).any()):
        return None
    return row_targets(targets, soft)
