"""LoRA dropout on the fused path (`adapters.dropout`): the fused nodes with dropout — the LoRA layer,
the q/k/v and gate/up groups, the SwiGLU+down node — give PEFT's own forward and gradients under
the same masks; the masks keep 1 − p of the elements, independently per layer, the same for the
same seed; and `F.dropout`'s multiplier bit for bit (the node's gradcheck under a mask:
test_fused_lora.py). Kill-and-resume with dropout is bit-exact:
tests/e2e/test_resume.py trains with `adapter.dropout=0.1`."""

import numpy as np
import pytest
import torch

from tests.tiny import make_tiny_model
from tests.unit.test_fused_lora import _random_lora
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.adapters import dropout
from tunesmith.adapters.fused_lora import FusedLoraLinear
from tunesmith.adapters.methods import apply_method
from tunesmith.config import AdapterConfig
from tunesmith.data.packing import unpacked
from tunesmith.train.kernels import attach
from tunesmith.train.kernels.attention import flatten


class SeededDropout(torch.nn.Module):
    """PEFT's dropout slot, drawing its mask as the fused nodes do: one seed per call, in call order."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * dropout.draw(self.p).noise(x)


def _model(tok, fused: bool, p: float):
    adapter = AdapterConfig(method="lora", rank=4, alpha=8, dropout=p, fused=fused)
    model = apply_method(make_tiny_model(len(tok)), adapter)
    _random_lora(model)
    return model.train()


@pytest.mark.parametrize("nodes", ["layers", "groups+mlp"])
def test_fused_dropout_matches_peft_under_the_same_masks(tiny_tokenizer, nodes):
    p = 0.05  # what users write
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    peft = _model(tiny_tokenizer, fused=False, p=p)
    for module in peft.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = SeededDropout(p)
    attach(peft, varlen=True)
    fused = _model(tiny_tokenizer, fused=True, p=p)
    attach(fused, varlen=True, mlp=nodes != "layers", groups=nodes != "layers")
    results = []
    for model in (fused, peft):
        torch.manual_seed(7)
        results.append(loss_and_grads(model, batches))
    assert_same(results[0], results[1])
    torch.manual_seed(8)  # other masks: another result (dropout is on)
    assert loss_and_grads(fused, batches)[0] != results[0][0]
    fused.eval()  # eval: no dropout, as PEFT
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        torch.testing.assert_close(fused(input_ids=ids).logits, fused(input_ids=ids).logits, rtol=0, atol=0)


def test_dropout_keeps_the_fused_path(tiny_tokenizer):
    model = _model(tiny_tokenizer, fused=True, p=0.1)
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    assert layer._fused_adapter(torch.randn(3, layer.in_features), (), {}) == "default"
    assert layer.dropout_mask("default").p == 0.1
    model.eval()
    assert layer.dropout_mask("default") is None


def test_masks_are_bernoulli_and_named_by_their_seed():
    n = 1 << 20
    masks = [dropout.Mask(seed, 0.05).keep(n, torch.device("cpu")) for seed in (1, 2)]
    for keep in masks:
        assert abs(keep.float().mean().item() - 0.95) < 5 * (0.05 * 0.95 / n) ** 0.5  # 5 sigma
    both = (masks[0] & masks[1]).float().mean().item()  # independent: P(both kept) = 0.95²
    assert abs(both - 0.95**2) < 5 * (0.9025 * 0.0975 / n) ** 0.5
    assert torch.equal(dropout.Mask(1, 0.05).keep(n, torch.device("cpu")), masks[0])
    assert dropout.draw(0.0) is None
    torch.manual_seed(3)
    first = dropout.draw(0.05)
    torch.manual_seed(3)
    assert dropout.draw(0.05) == first != dropout.draw(0.05)  # seeds come from torch's generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_is_f_dropouts_multiplier(dtype):
    x = torch.randn(64, 48, dtype=dtype)
    mask = dropout.Mask(9, 0.05)
    keep = mask.keep(x.numel(), x.device).view(x.shape)
    reference = x * keep.to(dtype).div_(1 - 0.05)  # F.dropout: bernoulli_(1 - p), div_(1 - p), multiply
    assert torch.equal(x * mask.noise(x), reference)
    assert torch.equal((x * mask.noise(x) == 0), ~keep | (x == 0))


def _keep_in_one_call(seed: int, p: float, n: int) -> np.ndarray:
    """The mask `_draw_keep` defines, drawn from PCG64 in one call rather than in chunks."""
    gen = np.random.PCG64(seed)
    draws = gen.random_raw((n + 7) // 8).view(np.uint8)[:n]
    bucket = int(p * 256)
    keep, edge = draws > bucket, np.flatnonzero(draws == bucket)
    keep[edge] = (gen.random_raw(edge.size) >> np.uint64(11)) * 2.0**-53 >= p * 256 - bucket
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mask_is_kept_as_bits_and_applied_in_place_as_noise_would(dtype):
    from tunesmith.adapters.storage import fresh
    from tunesmith.train.kernels.scratch import scratch

    n = 5 * (8 * dropout.CHUNK // 5 + 1601)  # more than one chunk, not a whole number of bytes
    x = torch.randn(n, dtype=dtype).view(5, n // 5)
    expected = torch.from_numpy(_keep_in_one_call(4, 0.05, n))
    for buffer in (fresh, scratch):
        mask = dropout.Mask(4, 0.05, buffer)
        drawn = mask.keep(n, torch.device("cpu"))  # the first call draws
        assert torch.equal(drawn, expected)  # chunked draws are one PCG64 stream
        assert mask._bits.size == (n + 7) // 8 and mask._bits.dtype == np.uint8  # one bit an element
        assert torch.equal(mask.keep(n, torch.device("cpu")), drawn)  # later calls unpack the same mask
        reference = x * mask.noise(x)
        zeroed = x * drawn.view(x.shape)
        assert torch.equal(mask.kept(x), zeroed) and torch.equal(mask.kept_(x.clone()), zeroed)
        assert torch.equal(mask.dropped(x), reference) and torch.equal(mask.drop_(x.clone()), reference)
        words = mask.words(x)
        assert words.shape == x.shape and words.element_size() == x.element_size()
        g, a, target = torch.randn(5, 3, dtype=dtype), torch.randn(3, n // 5, dtype=dtype), torch.randn_like(x)
        torch.testing.assert_close(mask.add_kept_(target.clone(), g, a, words), target + (g @ a) * drawn.view(x.shape))
        other = dropout.Mask(4, 0.05, buffer)  # a new draw of the same seed, first applied in place
        assert torch.equal(other.drop_(x.clone()), reference)


def test_masks_drawn_into_reused_buffers_give_the_same_training(tiny_tokenizer):
    from tunesmith.train.kernels.scratch import scratch

    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    results = []
    for reuse in (False, True):
        model = _model(tiny_tokenizer, fused=True, p=0.1)
        fast = attach(model, varlen=True, mlp=True, groups=True)
        if reuse:
            fast.reuse_buffers()
            layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
            assert layers and all(m.buffer is scratch for m in layers)
            assert layers[0].dropout_mask("default").buffer is scratch
        torch.manual_seed(7)
        results.append(loss_and_grads(model, batches))
        fast.restore()
        assert all(m.buffer is dropout.fresh for m in model.modules() if isinstance(m, FusedLoraLinear))
    assert_same(results[0], results[1], tol=0)
