"""Compact storage for frozen weights — NF4 (QLoRA's 4-bit NormalFloat) or bf16 — dequantized
on the fly, in plain PyTorch, so QLoRA runs on a CPU.

Contract:
- `quantize(weight, block_size=64, double_quant=True)` → `NF4Storage`: every `block_size`
  consecutive weights (row-major) share one absmax scale; each weight becomes the index of the
  nearest of the 16 NF4 levels, two indices per byte. With `double_quant` the fp32 scales are
  themselves stored as int8 around their mean, one fp32 scale per 256 of them (QLoRA's double
  quantization): 4.5 → ~4.13 bits a weight at block 64. `storage.dequantize(dtype)` returns the
  weight in its original shape; the error is at most half the widest gap between NF4 levels
  (-1 → -0.696: 0.152) times the block's absmax (plus the scale's own rounding with double_quant).
- `quantize_int4(weight, block_size=32)` → `Int4Storage`: asymmetric 4-bit, as GGUF's Q4_1 —
  every block keeps its minimum and step (fp16 each) and a weight becomes `min + step · q`, q in
  0..15: 5 bits a weight at block 32. A weight that already sits on such a grid (the bundled
  SmolLM2 comes from a Q4_1 GGUF, block 32) is stored exactly; NF4 would round it again.
- `FrozenLinear` (an `nn.Linear`, so PEFT wraps it with an ordinary LoRA layer and saves an
  ordinary LoRA adapter) and `FrozenEmbedding` hold a storage instead of a weight Parameter. The
  linear's autograd saves only its input: backward dequantizes again rather than keeping a
  full-precision copy of every layer alive between forward and backward. Its decodes write into
  tensors its `buffer` attribute hands out (fresh ones by default; training's `kernels.prepare` sets
  the reused scratch buffers, so the ~200 decodes of a step stop faulting in fresh pages: a fp32
  576 × 1,536 weight is 3.5 MB of new mappings a decode, with the codes' int32 copy).
- `compress_frozen(model, linear, embeddings, block_size, double_quant)` swaps the model's
  plain `nn.Linear` layers (not the output head) and its input embeddings + output head for
  frozen versions; `linear` and `embeddings` are each "nf4", "int4", "bf16" or None (leave as is). A tied
  head shares the embedding's storage. Call it before PEFT wraps the model.
- `storage_bytes(model)` counts the bytes of frozen weights (storage + frozen parameters).
bitsandbytes 0.50 also runs NF4 on CPU, but is a 125 MB wheel of GPU libraries, needs
`in_features` to be a multiple of the block size, and on AVX512-BF16 CPUs rewrites a layer's
storage in place (bf16 scales) the first time it runs under `no_grad` in eval mode — a validation
pass changes the numbers of later training steps, which breaks bit-exact resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, Dettmers
# et al. 2023; the same constants as bitsandbytes).
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171638489,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# byte → (level of high nibble, level of low nibble): one gather dequantizes two weights.
_PAIR_LUT = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)
SCALE_BLOCK = 256  # absmax values per fp32 scale under double quantization
_CHUNK = 1 << 22  # weights normalised per step while quantizing: bounds the temporary memory


def fresh(tag: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The default `buffer` of a decode: a fresh tensor (`train.kernels.scratch.scratch` takes the
    same arguments and reuses one buffer per tag)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _in_dtype(values: torch.Tensor, dtype, buffer) -> torch.Tensor:
    """fp32 `values` in `dtype`: themselves, or a copy in `buffer("frozen.weight", …)`."""
    if values.dtype == dtype:
        return values
    return buffer("frozen.weight", values.shape, dtype, values.device).copy_(values)


class _BlockStorage(torch.nn.Module):
    """Packed 4-bit codes (two a byte, row-major) and per-block parameters of one weight matrix, as
    buffers so `.to(device)` moves them. Subclasses give `_per_block()` (tensors with one value a
    block) and `_decode(codes, *per_block, dtype, buffer)` → [blocks × block_size] values, written
    into tensors `buffer(tag, shape, dtype, device)` hands out (tags "frozen.*")."""

    def dequantize(self, dtype=None, buffer=fresh) -> torch.Tensor:
        """The weight in `dtype`; with a reusing `buffer` it is valid until that buffer's next use."""
        flat = self._decode(self.codes, *self._per_block(), dtype or self.dtype, buffer).view(-1)
        return flat[: math.prod(self.shape)].view(self.shape)

    def _pairs(self, codes: torch.Tensor, lut: torch.Tensor, buffer) -> torch.Tensor:
        """Each code byte's two LUT values (fp32), as [blocks × block_size]. The gather moves each
        pair as one 8-byte element: torch's CPU `index_select` of [256 × 2] rows took 3.7× as long."""
        index = buffer("frozen.codes", codes.shape, torch.int32, codes.device).copy_(codes)
        out = buffer("frozen.values", (codes.numel(), 2), torch.float32, codes.device)
        pairs = lut.to(codes.device).contiguous().view(torch.int64).view(-1)
        torch.index_select(pairs, 0, index, out=out.view(torch.int64).view(-1))
        return out.view(-1, self.block_size)

    def rows(self, ids: torch.Tensor, dtype=None) -> torch.Tensor:
        """Rows `ids` of a 2-D weight, decoding only those rows when rows align with blocks."""
        n_rows, width = self.shape
        if width % self.block_size:
            return F.embedding(ids, self.dequantize(dtype))
        codes = self.codes[: n_rows * width // 2].view(n_rows, width // 2)[ids].reshape(-1)
        per_row = width // self.block_size
        params = [t[: n_rows * per_row].view(n_rows, per_row)[ids].reshape(-1) for t in self._per_block()]
        return self._decode(codes, *params, dtype or self.dtype, fresh).view(*ids.shape, width)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class NF4Storage(_BlockStorage):
    """NF4 codes + block absmax scales (optionally double-quantized)."""

    def __init__(self, codes, absmax, scale_codes, scale_scales, scale_mean, shape, block_size, dtype):
        super().__init__()
        # Not persistent: a state_dict of a compressed model must never pass for real weights.
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("scale_codes", scale_codes, persistent=False)
        self.register_buffer("scale_scales", scale_scales, persistent=False)
        self.register_buffer("scale_mean", scale_mean, persistent=False)
        self.shape, self.block_size, self.dtype = tuple(shape), block_size, dtype

    def scales(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        n = self.scale_codes.numel()
        pad = self.scale_scales.numel() * SCALE_BLOCK - n
        codes = F.pad(self.scale_codes.float(), (0, pad)).view(-1, SCALE_BLOCK)
        values = (codes * self.scale_scales[:, None]).view(-1)[:n] + self.scale_mean
        return values.clamp_min(0.0)

    def _per_block(self):
        return (self.scales(),)

    def _decode(self, codes: torch.Tensor, scales: torch.Tensor, dtype, buffer) -> torch.Tensor:
        values = self._pairs(codes, _PAIR_LUT, buffer).mul_(scales.reshape(-1, 1))
        return _in_dtype(values, dtype, buffer)


_INT_PAIR_LUT = torch.stack([torch.arange(16.0).repeat_interleave(16), torch.arange(16.0).repeat(16)], dim=1)


class Int4Storage(_BlockStorage):
    """4-bit codes + per-block fp16 minimum and step: a weight is `minimum + step · q`."""

    def __init__(self, codes, step, minimum, shape, block_size, dtype):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("step", step, persistent=False)
        self.register_buffer("minimum", minimum, persistent=False)
        self.shape, self.block_size, self.dtype = tuple(shape), block_size, dtype

    def _per_block(self):
        return self.step, self.minimum

    def _decode(self, codes, step, minimum, dtype, buffer) -> torch.Tensor:
        q = self._pairs(codes, _INT_PAIR_LUT, buffer)
        values = torch.addcmul(minimum.float().reshape(-1, 1), q, step.float().reshape(-1, 1), out=q)
        return _in_dtype(values, dtype, buffer)


def _blocks(weight: torch.Tensor, block_size: int, pad_with_last: bool = False) -> torch.Tensor:
    """The weight, row-major, as [blocks × block_size], the last block padded (zeros, or its last value)."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")
    flat = weight.detach().reshape(-1)
    n_blocks = max(1, math.ceil(flat.numel() / block_size))
    pad = n_blocks * block_size - flat.numel()
    if not pad:  # no copy when the weight fills whole blocks (the usual case; an embedding is 100+ MB)
        return flat.view(n_blocks, block_size)
    return F.pad(flat, (0, pad), value=float(flat[-1]) if pad_with_last else 0.0).view(n_blocks, block_size)


def quantize_int4(weight: torch.Tensor, block_size: int = 32) -> Int4Storage:
    padded = _blocks(weight, block_size, pad_with_last=True)  # padding must not widen a block's range
    n_blocks = padded.shape[0]
    minimum = padded.amin(dim=1).half()
    step = ((padded.amax(dim=1).float() - minimum.float()) / 15.0).half()
    codes = torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, device=weight.device)
    rows_per_chunk = max(1, _CHUNK // block_size)
    half = block_size // 2
    for start in range(0, n_blocks, rows_per_chunk):
        block = padded[start : start + rows_per_chunk].float()
        lo = minimum[start : start + rows_per_chunk, None].float()
        d = step[start : start + rows_per_chunk, None].float().clamp_min(torch.finfo(torch.float32).tiny)
        idx = torch.round((block - lo) / d).clamp_(0, 15).to(torch.uint8).view(-1, 2)
        codes[start * half : start * half + idx.shape[0]] = (idx[:, 0] << 4) | idx[:, 1]
    return Int4Storage(codes, step, minimum, weight.shape, block_size, weight.dtype)


class BF16Storage(torch.nn.Module):
    """A frozen weight kept in bf16 and handed out in the compute dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("data", weight.detach().to(torch.bfloat16), persistent=False)
        self.shape, self.dtype = tuple(weight.shape), weight.dtype

    def dequantize(self, dtype=None, buffer=fresh) -> torch.Tensor:
        return self.data.to(dtype or self.dtype)

    def rows(self, ids: torch.Tensor, dtype=None) -> torch.Tensor:
        return F.embedding(ids, self.data).to(dtype or self.dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Storage:
    padded = _blocks(weight, block_size)
    n_blocks = padded.shape[0]
    absmax = padded.abs().amax(dim=1).float()
    codes = torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, device=weight.device)
    mids = _MIDPOINTS.to(weight.device)
    rows_per_chunk = max(1, _CHUNK // block_size)
    for start in range(0, n_blocks, rows_per_chunk):
        block = padded[start : start + rows_per_chunk].float()
        scale = absmax[start : start + rows_per_chunk, None].clamp_min(torch.finfo(torch.float32).tiny)
        idx = torch.bucketize(block / scale, mids).to(torch.uint8).view(-1, 2)
        half = block_size // 2
        codes[start * half : start * half + idx.shape[0]] = (idx[:, 0] << 4) | idx[:, 1]
    if not double_quant:
        return NF4Storage(codes, absmax, None, None, None, weight.shape, block_size, weight.dtype)
    mean = absmax.mean()
    centred = absmax - mean
    n_scale_blocks = math.ceil(n_blocks / SCALE_BLOCK)
    grouped = F.pad(centred, (0, n_scale_blocks * SCALE_BLOCK - n_blocks)).view(n_scale_blocks, SCALE_BLOCK)
    scale_scales = grouped.abs().amax(dim=1) / 127.0
    scale_codes = torch.round(grouped / scale_scales.clamp_min(1e-30)[:, None]).clamp(-127, 127)
    scale_codes = scale_codes.to(torch.int8).view(-1)[:n_blocks].clone()
    return NF4Storage(codes, None, scale_codes, scale_scales, mean, weight.shape, block_size, weight.dtype)


class _FrozenMatmul(torch.autograd.Function):
    """x @ W.T where W is rebuilt from storage in forward and again in backward, so the graph
    holds the input only, never a full-precision weight. `buffer` gives the decode its tensors."""

    @staticmethod
    def forward(ctx, x, storage, buffer):
        ctx.storage, ctx.buffer = storage, buffer
        return x @ storage.dequantize(x.dtype, buffer).t()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ ctx.storage.dequantize(grad.dtype, ctx.buffer), None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FrozenLinear(torch.nn.Linear):
    """A frozen `nn.Linear` whose weight lives in a storage. Subclassing `nn.Linear` is what
    lets PEFT ('all-linear', its default dispatcher) treat it as any other linear layer."""

    def __init__(self, storage, bias: torch.Tensor | None):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = storage.shape
        self.storage = storage
        self.buffer = fresh  # where its decodes write; training sets `train.kernels.scratch.scratch`
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy, for code that reads the weight (PEFT's DoRA norms); never assign."""
        return self.storage.dequantize()

    def forward(self, x):
        dtype = _compute_dtype(x)
        out = _FrozenMatmul.apply(x.to(dtype), self.storage, self.buffer)
        return out if self.bias is None else out + self.bias.to(dtype)


class FrozenEmbedding(torch.nn.Embedding):
    """A frozen `nn.Embedding` that decodes only the looked-up rows."""

    def __init__(self, storage, padding_idx=None):
        torch.nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = storage.shape
        self.padding_idx, self.max_norm, self.sparse = padding_idx, None, False
        self.norm_type, self.scale_grad_by_freq = 2.0, False
        self.storage = storage

    @property
    def weight(self) -> torch.Tensor:
        return self.storage.dequantize()

    def forward(self, ids):
        return self.storage.rows(ids)


def _store(weight: torch.Tensor, kind: str, block_size: int, double_quant: bool):
    if kind == "nf4":
        return quantize(weight, block_size, double_quant)
    if kind == "int4":
        return quantize_int4(weight, block_size)
    return BF16Storage(weight)


def _replace(model, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def compress_frozen(model, linear: str | None, embeddings: str | None, block_size: int = 64, double_quant: bool = True):
    """Swap frozen layers for stored ones in place (see the module docstring); returns model."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if linear:
        for name, module in list(model.named_modules()):
            # Exact type: subclasses may do more in forward than a matmul (and the head is separate).
            if type(module) is torch.nn.Linear and module is not head:
                _replace(
                    model, name, FrozenLinear(_store(module.weight, linear, block_size, double_quant), module.bias)
                )
                module.weight = None  # let the full-precision copy go now, not when the loop ends
    if embeddings and type(embed) is torch.nn.Embedding:
        storage = _store(embed.weight, embeddings, block_size, double_quant)
        tied = head is not None and head.weight is embed.weight
        model.set_input_embeddings(FrozenEmbedding(storage, embed.padding_idx))
        if tied and type(head) is torch.nn.Linear:
            model.set_output_embeddings(FrozenLinear(storage, head.bias))
        elif type(head) is torch.nn.Linear:
            model.set_output_embeddings(
                FrozenLinear(_store(head.weight, embeddings, block_size, double_quant), head.bias)
            )
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _storages(model):
    seen = set()
    for module in model.modules():
        if isinstance(module, (_BlockStorage, BF16Storage)) and id(module) not in seen:
            seen.add(id(module))
            yield module


def stored_parameters(model) -> int:
    """How many weights live in storages (shared ones once) rather than in parameters."""
    return sum(math.prod(s.shape) for s in _storages(model))


def storage_bytes(model) -> int:
    """Bytes of frozen weights: every storage (shared ones once) plus frozen parameters."""
    total = sum(s.nbytes() for s in _storages(model))
    params = {id(p): p for p in model.parameters() if not p.requires_grad}
    return total + sum(p.numel() * p.element_size() for p in params.values())
