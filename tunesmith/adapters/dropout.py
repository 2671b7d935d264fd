"""LoRA dropout inside the fused nodes: a mask named by a seed, drawn fast, kept as one bit an element.

Contract: `draw(p, buffer)` → a `Mask` (or None when `p` is 0): one 63-bit seed taken from torch's
global CPU generator — the state a checkpoint saves (`train.checkpoint.rng_state`), so a resumed run
draws the same masks. Each element is kept with probability 1 − p, independently (exactly, see
`_draw_keep`); the same seed gives the same mask every time. `mask.noise(like)` is PEFT's dropout
multiplier `keep / (1 − p)` with the values `torch.nn.functional.dropout`'s has, so `x · noise` is
bit for bit what PEFT's dropout gives for that mask. The nodes use `kept(x)` — `x` with the dropped
elements zeroed, not scaled — and multiply their small [tokens × rank] products by `mask.scale`
= 1/(1 − p): the same values up to rounding, one pass over `x` instead of two. `buffer(tag, shape,
dtype, device)` gives the temporaries (`storage.fresh` by default; training's `kernels.prepare`
hands the layers `train.kernels.scratch.scratch`, reused buffers).

Why: on a CPU, torch's `bernoulli_` (what `nn.Dropout` calls) draws one Mersenne-Twister number at
a time on one thread (~7 ns an element on an AMD EPYC; PEFT's dropout, mask and multiply, ~22 ns),
and autograd keeps each dropped copy of the input until backward: with LoRA on all seven
projections that is ~5,000 values per token and layer. numpy's PCG64 gives eight 8-bit draws per
64-bit word (~0.25 ns an element); the mask is kept packed, one bit an element (a byte an element was
+0.1 GiB of peak RSS on SmolLM2 at 4 × 128 tokens, +0.3 GiB at 2,048 tokens). Applying it is a
bitwise AND of `x`'s bits with an all-ones-or-zero word per element: torch's mixed-dtype multiply
by a byte mask converts the mask into a fresh tensor first, and on this project's VMs a fresh
tensor above 1 MiB faults in every page (~1.9 µs a 4 KiB page). Draw, apply and backward cost ~6 ns
an element in a SmolLM2 step that way, ~2 ns with every temporary drawn in chunks under 1 MiB or
taken from `buffer`.
"""

from __future__ import annotations

import numpy as np
import torch

from tunesmith.adapters.storage import fresh

CHUNK = 1 << 16  # 64-bit words a numpy call draws or bytes it unpacks: its temporaries stay < 1 MiB
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CPU = torch.device("cpu")


class Mask:
    """One dropout draw: `seed` names it, `p` is the drop probability. The keep mask is drawn on first
    use and held, packed eight elements a byte, until the node that drew it is freed (backward
    reads it again: ~0.01 GB for a 512-token forward of SmolLM2 with LoRA on all seven projections)."""

    def __init__(self, seed: int, p: float, buffer=fresh):
        self.seed, self.p, self.buffer = seed, p, buffer
        self._bits: np.ndarray | None = None  # the keep mask, one bit an element
        self._numel = -1

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and (self.seed, self.p) == (other.seed, other.p)

    @property
    def scale(self) -> float:
        """1/(1 − p): the nodes multiply their [tokens × rank] products by it, not the input."""
        return 1.0 / (1.0 - self.p)

    def keep(self, numel: int, device: torch.device) -> torch.Tensor:
        """`numel` booleans, each True with probability 1 − p, exactly (to 2⁻⁵³)."""
        self._drawn(numel)
        return torch.from_numpy(np.unpackbits(self._bits, count=numel, bitorder="little")).to(device).bool()

    def words(self, like: torch.Tensor) -> torch.Tensor:
        """The mask as integers of `like`'s width shaped like it: −1 (all ones) kept, 0 dropped, in
        `buffer("dropout.mask", …)`. A node that applies the mask twice gets it once and passes it on."""
        numel, ints = like.numel(), _INTS[like.element_size()]
        out = self.buffer("dropout.mask", (numel,), ints, like.device)
        drawn = self._drawn(numel)
        if drawn is not None:  # just drawn: the unpacked bytes are still at hand
            out.copy_(torch.from_numpy(drawn.view(np.uint8)))
        elif like.device.type != "cpu":
            out.copy_(torch.from_numpy(np.unpackbits(self._bits, count=numel, bitorder="little")).to(like.device))
        else:  # unpacked a chunk at a time: numpy's temporaries stay on the heap, no page faults
            for start in range(0, numel, 8 * CHUNK):
                stop = min(numel, start + 8 * CHUNK)
                part = np.unpackbits(self._bits[start // 8 : (stop + 7) // 8], count=stop - start, bitorder="little")
                out[start:stop].copy_(torch.from_numpy(part))
        return out.neg_().view(like.shape)

    def kept(self, x: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """`x` with the dropped elements zeroed, not scaled (one pass), in `buffer("dropout.x", …)`."""
        ints = _INTS[x.element_size()]
        words = self.words(x) if words is None else words
        out = self.buffer("dropout.x", x.shape, x.dtype, x.device)
        torch.bitwise_and(x.view(ints), words.view(x.shape), out=out.view(ints))
        return out

    def kept_(self, t: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """`t` with the dropped elements zeroed in place (a gradient through the dropout, before 1/(1 − p))."""
        words = self.words(t) if words is None else words
        view = t.view(_INTS[t.element_size()])
        view.bitwise_and_(words.view(t.shape))
        return t

    def add_kept_(self, target: torch.Tensor, g: torch.Tensor, a: torch.Tensor, words=None) -> torch.Tensor:
        """`target += g a` with the dropped elements of `g a` zeroed — the dropout's backward into an
        input's gradient ([rows × in] all three flattened); `g a` goes to `buffer("dropout.back", …)`."""
        back = self.buffer("dropout.back", (g.shape[0], a.shape[1]), target.dtype, target.device)
        return target.add_(self.kept_(torch.mm(g, a, out=back), words))

    def _scale(self, like: torch.Tensor) -> torch.Tensor:
        """1/(1 − p) in `like`'s dtype, computed as `F.dropout`'s `div_` computes it."""
        return torch.ones((), dtype=like.dtype, device=like.device).div_(1.0 - self.p)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The multiplier `keep / (1 − p)` shaped like `like`, with `F.dropout`'s values: 1/(1 − p)
        computed in `like`'s dtype as its `div_` computes it, or 0."""
        keep = self.keep(like.numel(), like.device)
        return keep.view(like.shape).to(like.dtype).mul_(self._scale(like))

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """`x · noise(x)` (bit for bit, up to the sign of a zero)."""
        return self.kept(x).mul_(self._scale(x))

    def drop_(self, t: torch.Tensor) -> torch.Tensor:
        """`t ·= noise(t)` in place (a gradient through the dropout)."""
        return self.kept_(t).mul_(self._scale(t))

    def _drawn(self, numel: int) -> np.ndarray | None:
        """Draw the mask unless it is drawn for `numel` elements already; returns the keep bytes of a
        new draw (a view of a `buffer` valid until the next draw), else None."""
        if self._bits is not None and self._numel == numel:
            return None
        keep = _draw_keep(self.seed, self.p, numel, self.buffer)
        self._bits, self._numel = np.packbits(keep, bitorder="little"), numel
        return keep


def _draw_keep(seed: int, p: float, numel: int, buffer=fresh) -> np.ndarray:
    """8-bit draws (eight a PCG64 word): an element is kept above the p·2⁸ bucket, dropped below it;
    the 2⁻⁸ of elements in the bucket draw again (53 bits), so P(keep) is 1 − p exactly. Returns
    `numel` booleans in `buffer("dropout.keep", …)`; the stream is one PCG64 stream however it is
    chunked."""
    gen = np.random.PCG64(seed)
    scaled = p * 256.0
    bucket = np.uint8(int(scaled))
    keep = buffer("dropout.keep", (numel,), torch.bool, CPU).numpy()
    edge = buffer("dropout.edge", (numel,), torch.bool, CPU).numpy()
    for start in range(0, numel, 8 * CHUNK):
        stop = min(numel, start + 8 * CHUNK)
        draws = gen.random_raw((stop - start + 7) // 8).view(np.uint8)[: stop - start]
        np.greater(draws, bucket, out=keep[start:stop])
        np.equal(draws, bucket, out=edge[start:stop])
    edges = np.flatnonzero(edge)
    if edges.size:
        fine = (gen.random_raw(edges.size) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        keep[edges] = fine >= scaled - int(scaled)
    return keep


def draw(p: float, buffer=fresh) -> Mask | None:
    if p <= 0.0:
        return None
    return Mask(int(torch.randint(0, 2**63 - 1, (1,)).item()), float(p), buffer)


def dropout_p(module) -> float:
    """The probability a PEFT `lora_dropout` entry drops with now: 0 for Identity or in eval mode."""
    if isinstance(module, torch.nn.Dropout) and module.training:
        return float(module.p)
    return 0.0
