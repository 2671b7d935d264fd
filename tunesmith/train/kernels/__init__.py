"""Training fast paths: the one place they attach to a model, and the one table of model families.

Contract: `prepare(model, cfg, device, dist)` attaches what `cfg.train` turns on — per-sample
attention over padding-free rows (`padding_free`), the SwiGLU+down node (`fused_mlp`), the RMSNorm
node (`fused_norm`), RoPE inside the attention node (`fused_rope`, padding-free only) — moves the
model to `device`, then groups sibling projections (`fused_groups`, one process only: a group's
weights are views of one buffer, which `.to()` and DDP/FSDP would split), and has qlora's frozen
4-bit linears decode their weights, and LoRA dropout's masks put their temporaries, into reused
scratch buffers (`reuse_buffers`). It returns a `Prepared` context; leaving it (or `restore()`)
puts every module back as transformers built it, which generation needs (masks, the KV cache).
`attach(model, **flags)` is the same without the move.

A module takes a fast path when its class is in `FAMILIES`; anything else trains on the generic
path (transformers' own forward), just slower. Adding an architecture is one row here plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.adapters import storage
from tunesmith.adapters.fused_lora import FusedLoraLinear
from tunesmith.train.kernels import attention, groups, mlp, norm, rope
from tunesmith.train.kernels.patch import patch_forward, unpatch
from tunesmith.train.kernels.scratch import scratch as reused  # not `scratch`: that name is the submodule


@dataclass(frozen=True)
class Family:
    attention: str  # q/k/v grouped; RoPE fused into the attention node
    mlp: str  # gate/up grouped; silu(gate)·up and the down projection as one node
    norm: str  # RMSNorm as one node
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)


FAMILIES = {
    "llama": Family("LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "mistral": Family("MistralAttention", "MistralMLP", "MistralRMSNorm"),
    "qwen2": Family("Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "qwen3": Family("Qwen3Attention", "Qwen3MLP", "Qwen3RMSNorm", qk_norm=True),
}
ATTENTION = {f.attention: f for f in FAMILIES.values()}
MLP = {f.mlp: f for f in FAMILIES.values()}
NORM = {f.norm: f for f in FAMILIES.values()}
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def family_of(model) -> str | None:
    """The `FAMILIES` key whose classes the model is built from, or None (generic path only)."""
    for module in model.modules():
        for key, family in FAMILIES.items():
            if type(module).__name__ == family.attention:
                return key
    return None


class Prepared:
    """A model with fast paths attached; a context manager that restores the model on exit."""

    def __init__(self, model):
        self.model = model
        self.previous_attention: str | None = None  # set while per-sample attention is on
        self.patched: list = []  # modules whose forward is ours
        self.groups: list = []
        self.buffered: list = []  # frozen 4-bit/bf16 linears whose decodes write into scratch buffers

    @property
    def flat(self) -> bool:
        """Whether batches must be flattened to one padding-free row (`attention.flatten`)."""
        return self.previous_attention is not None

    def attach(
        self, varlen=False, mlp_node=False, norm_node=False, rope_node=False, group=False, max_length: int | None = None
    ) -> Prepared:
        """`max_length`: the longest sample the model will see (a sliding window at least that long
        changes nothing, so per-sample attention may serve it)."""
        if varlen and self.previous_attention is None:
            self.previous_attention = attention.use_varlen(self.model, max_length)
        rope_node = rope_node and (self.flat or attention.is_varlen(self.model))
        for module in self.model.modules():
            name = type(module).__name__
            if mlp_node and name in MLP and mlp.takes(module):
                self._patch(module, mlp.fused_forward)
            elif norm_node and name in NORM and norm.takes(module):
                self._patch(module, norm.fused_forward)
            elif rope_node and name in ATTENTION:
                self._patch(module, rope.fused_forward)
        if group:
            self._group()
        return self

    def reuse_buffers(self) -> None:
        """Frozen stored linears (qlora's NF4/int4) decode their weight, and fused LoRA layers draw
        their dropout masks, into reused scratch buffers."""
        for module in self.model.modules():
            if type(module) in (storage.FrozenLinear, FusedLoraLinear) and module.buffer is storage.fresh:
                module.buffer = reused
                self.buffered.append(module)

    def _patch(self, module, forward) -> None:
        patch_forward(module, forward)
        self.patched.append(module)

    def _group(self) -> None:
        found = []
        for module in self.model.modules():
            name = type(module).__name__
            names = QKV if name in ATTENTION else GATE_UP if name in MLP else None
            if names and all(hasattr(module, n) for n in names):
                group = groups.group_projections([getattr(module, n) for n in names])
                if group is not None:
                    found.append(group)
        groups.leave_the_file(self.model, found)
        self.groups += found

    def restore(self) -> None:
        groups.ungroup(self.groups)
        for module in self.buffered:
            module.buffer = storage.fresh
        for module in self.patched:
            unpatch(module)
        attention.restore(self.model, self.previous_attention)
        self.groups, self.patched, self.buffered, self.previous_attention = [], [], [], None

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def attach(model, varlen=False, mlp=False, norm=False, rope=False, groups=False, max_length=None) -> Prepared:
    """The fast paths named, on `model` as it is (tests and benchmarks; training uses `prepare`)."""
    return Prepared(model).attach(varlen, mlp, norm, rope, groups, max_length)


def prepare(model, cfg, device: torch.device, dist) -> Prepared:
    t = cfg.train
    fast = Prepared(model)
    try:
        fast.attach(
            varlen=t.padding_free,
            mlp_node=t.fused_mlp,
            norm_node=t.fused_norm,
            rope_node=t.fused_rope,
            max_length=cfg.data.max_length,
        )
        model.to(device)
        fast.attach(group=t.fused_groups and not dist.enabled)
        fast.reuse_buffers()
    except BaseException:
        fast.restore()
        raise
    return fast
