"""LoRA dropout inside the fused nodes: a mask named by a seed, drawn fast, kept as one bit an element.

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
LoRA on all seven projections that is ~5,000 values per token and layer. numpy's PCG64 gives
eight 8-bit draws per 64-bit word (~2 ns an element, seeding and compare included); the node keeps
the mask packed, one bit an element (a byte an element was +0.1 GiB of peak RSS on SmolLM2 at
4 × 128 tokens, +0.3 GiB at 2,048 tokens), unpacks it in backward, and `dropped`/`drop_` apply it
with two in-place passes instead of building a float multiplier (`torch.where` with 0-dim
operands: ~10 ns an element).
"""

from __future__ import annotations

import numpy as np
import torch

from tunesmith.adapters.storage import fresh


class Mask:
    """One dropout draw: `seed` names it, `p` is the drop probability. The keep mask is drawn on first
    use and held, packed eight elements a byte, until the node that drew it is freed (backward
    reads it again: ~0.01 GB for a 512-token forward of SmolLM2 with LoRA on all seven projections).

    `dropped` writes into `buffer(tag, shape, dtype, device)` (a fresh tensor by default; the
    training nodes pass `train.kernels.scratch.scratch`, so the [tokens × in] dropped input reuses
    one buffer across layers)."""

    def __init__(self, seed: int, p: float):
        self.seed, self.p = seed, p
        self._bits: np.ndarray | None = None  # the keep mask, one bit an element
        self._numel = -1

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and (self.seed, self.p) == (other.seed, other.p)

    def keep(self, numel: int, device: torch.device) -> torch.Tensor:
        """`numel` booleans, each True with probability 1 − p, exactly (to 2⁻⁵³)."""
        return self._keep_bytes(numel, device).bool()

    def _keep_bytes(self, numel: int, device: torch.device) -> torch.Tensor:
        """The keep mask as `numel` bytes, 1 kept and 0 dropped (the first call draws and packs it;
        numpy's `unpackbits` is ~25× faster than shifting and masking in torch)."""
        if self._bits is None or self._numel != numel:
            keep = _draw_keep(self.seed, self.p, numel)
            self._bits, self._numel = np.packbits(keep, bitorder="little"), numel
            return torch.from_numpy(keep.view(np.uint8)).to(device)
        return torch.from_numpy(np.unpackbits(self._bits, count=numel, bitorder="little")).to(device)

    def _scale(self, like: torch.Tensor) -> torch.Tensor:
        """1/(1 − p) in `like`'s dtype, computed as `F.dropout`'s `div_` computes it."""
        return torch.ones((), dtype=like.dtype, device=like.device).div_(1.0 - self.p)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The multiplier `keep / (1 − p)` shaped like `like`, with `F.dropout`'s values: 1/(1 − p)
        computed in `like`'s dtype as its `div_` computes it, or 0."""
        keep = self._keep_bytes(like.numel(), like.device)
        return keep.view(like.shape).to(like.dtype).mul_(self._scale(like))

    def dropped(self, x: torch.Tensor, buffer=fresh) -> torch.Tensor:
        """`x · noise(x)` (bit for bit, up to the sign of a zero) in `buffer("dropout.x", …)`."""
        out = buffer("dropout.x", x.shape, x.dtype, x.device)
        keep = self._keep_bytes(x.numel(), x.device).view(x.shape)
        return torch.mul(x, self._scale(x), out=out).mul_(keep)

    def drop_(self, t: torch.Tensor) -> torch.Tensor:
        """`t ·= noise(t)` in place (a gradient through the dropout)."""
        return t.mul_(self._scale(t)).mul_(self._keep_bytes(t.numel(), t.device).view(t.shape))


def _draw_keep(seed: int, p: float, numel: int) -> np.ndarray:
    """8-bit draws (eight a PCG64 word): an element is kept above the p·2⁸ bucket, dropped below it;
    the 2⁻⁸ of elements in the bucket draw again (53 bits), so P(keep) is 1 − p exactly."""
    gen = np.random.PCG64(seed)
    draws = gen.random_raw((numel + 7) // 8).view(np.uint8)[:numel]
    scaled = p * 256.0
    bucket = np.uint8(int(scaled))
    keep = draws > bucket
    edge = np.flatnonzero(draws == bucket)
    if edge.size:
        fine = (gen.random_raw(edge.size) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        keep[edge] = fine >= scaled - int(scaled)
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
