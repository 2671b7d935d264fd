"""LoRA dropout inside the fused nodes: a mask named by a seed, drawn fast, redrawn in backward.

Contract: `draw(p)` → a `Mask` (or None when `p` is 0): one 63-bit seed taken from torch's global
CPU generator — the state a checkpoint saves (`train.checkpoint.rng_state`), so a resumed run draws
the same masks. `mask.noise(like)` is PEFT's dropout multiplier for a tensor shaped like `like`:
`keep / (1 − p)` in `like`'s dtype, with `keep` ~ Bernoulli(1 − p) independently per element (to
2⁻³² — PEFT's `bernoulli_` resolves 2⁻²⁴), computed exactly as `torch.nn.functional.dropout`
computes its multiplier, so `x · noise` is bit for bit what PEFT's dropout gives for that mask.
The same seed gives the same mask every time, so a node keeps the seed, not the mask.

Why: on a CPU, torch's `bernoulli_` (what `nn.Dropout` calls) draws one Mersenne-Twister number at
a time on one thread (~7 ns an element on an AMD EPYC; PEFT's dropout, mask and multiply, ~22 ns),
and autograd keeps each dropped copy of the input until backward: with LoRA on all seven projections
that is ~5,000 values per token and layer. A counter-free PCG64 stream (numpy's, ~1 ns an element)
drawn from a seed costs a fifth of that, and redrawing it in backward costs no memory at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mask:
    seed: int
    p: float

    def keep(self, numel: int, device: torch.device) -> torch.Tensor:
        """`numel` booleans, each True with probability 1 − p."""
        words = np.random.PCG64(self.seed).random_raw((numel + 1) // 2)  # two 32-bit draws a word
        draws = torch.from_numpy(words.view(np.int32)[:numel])
        # uniform over int32: True with probability (2³¹ − threshold) / 2³² = 1 − p
        threshold = round(2**31 - (1.0 - self.p) * 2**32)
        return draws.ge(threshold).to(device)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The multiplier `keep / (1 − p)` shaped like `like`, as `F.dropout` builds it."""
        return self.keep(like.numel(), like.device).view(like.shape).to(like.dtype).div_(1.0 - self.p)


def draw(p: float) -> Mask | None:
    if p <= 0.0:
        return None
    return Mask(int(torch.randint(0, 2**63 - 1, (1,)).item()), float(p))


def dropout_p(module) -> float:
    """The probability a PEFT `lora_dropout` entry drops with now: 0 for Identity or in eval mode."""
    if isinstance(module, torch.nn.Dropout) and module.training:
        return float(module.p)
    return 0.0
