"""LoRA dropout inside the fused nodes: a mask named by a seed, drawn fast, kept as one byte an element.

Contract: `draw(p)` → a `Mask` (or None when `p` is 0): one 63-bit seed taken from torch's global
CPU generator — the state a checkpoint saves (`train.checkpoint.rng_state`), so a resumed run draws
the same masks. `mask.noise(like)` is PEFT's dropout multiplier for a tensor shaped like `like`:
`keep / (1 − p)` in `like`'s dtype, with `keep` ~ Bernoulli(1 − p) independently per element
(exactly, see `_draw_keep`), with the values `torch.nn.functional.dropout`'s multiplier has, so
`x · noise` is bit for bit what PEFT's dropout gives for that mask. The same seed gives the same
mask every time.

Why: on a CPU, torch's `bernoulli_` (what `nn.Dropout` calls) draws one Mersenne-Twister number at
a time on one thread (~7 ns an element on an AMD EPYC; PEFT's dropout, mask and multiply, ~22 ns),
and autograd keeps each dropped copy of the input (4 bytes an element in fp32) until backward: with
LoRA on all seven projections that is ~5,000 values per token and layer. numpy's PCG64 gives four
16-bit draws per 64-bit word, and the node keeps a one-byte mask instead of the dropped copy.
"""

from __future__ import annotations

import numpy as np
import torch


class Mask:
    """One dropout draw: `seed` names it, `p` is the drop probability. The keep mask is drawn on first
    use and held until the node that drew it is freed (backward reads it again: one byte an element,
    ~0.08 GB for a 512-token forward of SmolLM2 with LoRA on all seven projections)."""

    def __init__(self, seed: int, p: float):
        self.seed, self.p = seed, p
        self._keep: torch.Tensor | None = None

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and (self.seed, self.p) == (other.seed, other.p)

    def keep(self, numel: int, device: torch.device) -> torch.Tensor:
        """`numel` booleans, each True with probability 1 − p, exactly (to 2⁻⁵³)."""
        if self._keep is None or self._keep.numel() != numel:
            self._keep = torch.from_numpy(_draw_keep(self.seed, self.p, numel)).to(device)
        return self._keep

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The multiplier `keep / (1 − p)` shaped like `like`, with `F.dropout`'s values: 1/(1 − p)
        computed in `like`'s dtype as its `div_` computes it, or 0."""
        keep = self.keep(like.numel(), like.device).view(like.shape)
        scale = torch.ones((), dtype=like.dtype, device=like.device).div_(1.0 - self.p)
        return torch.where(keep, scale, torch.zeros((), dtype=like.dtype, device=like.device))


def _draw_keep(seed: int, p: float, numel: int) -> np.ndarray:
    """16-bit draws (four a PCG64 word): an element is kept above the p·2¹⁶ bucket, dropped below it;
    the 2⁻¹⁶ of elements in the bucket draw again (53 bits), so P(keep) is 1 − p exactly."""
    gen = np.random.PCG64(seed)
    draws = gen.random_raw((numel + 3) // 4).view(np.uint16)[:numel]
    scaled = p * 65536.0
    bucket = int(scaled)
    keep = draws > bucket
    edge = np.flatnonzero(draws == bucket)
    if edge.size:
        fine = (gen.random_raw(edge.size) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        keep[edge] = fine >= scaled - bucket
    return keep


def draw(p: float) -> Mask | None:
    if p <= 0.0:
        return None
    return Mask(int(torch.randint(0, 2**63 - 1, (1,)).item()), float(p))


def dropout_p(module) -> float:
    """The probability a PEFT `lora_dropout` entry drops with now: 0 for Identity or in eval mode."""
    if isinstance(module, torch.nn.Dropout) and module.training:
        return float(module.p)
    return 0.0
