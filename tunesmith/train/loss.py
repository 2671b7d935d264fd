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

Each sample's first label must be -100 (the packer guarantees it): in a packed row the
position before a sample's first token belongs to the previous sample.

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

IGNORE = -100
CHUNK = 2048


class LossModule(torch.nn.Module):
    """`token_loss` as a module, so DDP can wrap it: DDP only syncs gradients of work done
    inside its own forward, and this loss calls the decoder rather than `model.forward`."""

    def __init__(self, model, embed_into_grad: bool = False):
        super().__init__()
        self.model = model
        self.embed_into_grad = embed_into_grad

    def forward(self, input_ids, labels, position_ids=None):
        return token_loss(self.model, input_ids, labels, position_ids, self.embed_into_grad)


class EmbedIntoGrad(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose backward index-adds into `weight.grad` (created if None)
    instead of returning a dense gradient; must run outside DDP/FSDP (see the module doc)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)

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
        return None, None, None


def can_embed_into_grad(model) -> bool:
    """A plain, trainable `nn.Embedding` input layer (no scaling or max_norm)."""
    emb = unwrap(model).get_input_embeddings()
    return type(emb) is torch.nn.Embedding and emb.weight.requires_grad and emb.max_norm is None and not emb.sparse


def unwrap(model):
    """The underlying transformers model behind PEFT wrappers (layers stay shared)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _plain_head(model) -> bool:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    special = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")
    return all(getattr(text_cfg, k, None) in (None, 1, 1.0) for k in special)


def _ce_sum(head, hidden, targets):
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss(model, input_ids, labels, position_ids=None, embed_into_grad: bool = False):
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n_tokens = int(keep.sum())
    inner = unwrap(model)
    inputs = {"input_ids": input_ids}
    if embed_into_grad and torch.is_grad_enabled():
        emb = inner.get_input_embeddings()
        inputs = {"inputs_embeds": EmbedIntoGrad.apply(input_ids, emb.weight, emb.padding_idx)}
    if not _plain_head(inner) or not hasattr(inner, "get_decoder"):
        out = model(**inputs, position_ids=position_ids, use_cache=False)
        logits = out.logits[:, :-1][keep].float()
        return F.cross_entropy(logits, targets[keep], reduction="sum"), n_tokens
    hidden = inner.get_decoder()(**inputs, position_ids=position_ids, use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1][keep]
    targets = targets[keep]
    head = inner.get_output_embeddings()
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    if n_tokens <= CHUNK or not torch.is_grad_enabled():
        return _ce_sum(head, hidden, targets), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, CHUNK):
        end = start + CHUNK
        total = total + checkpoint(_ce_sum, head, hidden[start:end], targets[start:end], use_reentrant=False)
    return total, n_tokens
