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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_kept_as_bits_and_applied_in_place_as_noise_would(dtype):
    from tunesmith.adapters.storage import fresh
    from tunesmith.train.kernels.scratch import scratch

    n = 8 * 1000 + 5  # not a whole number of bytes
    mask = dropout.Mask(4, 0.05)
    drawn = mask.keep(n, torch.device("cpu"))  # the first call draws
    assert mask._bits.size == (n + 7) // 8 and mask._bits.dtype == np.uint8  # one bit an element
    assert torch.equal(mask.keep(n, torch.device("cpu")), drawn)  # later calls unpack the same mask
    x = torch.randn(n, dtype=dtype).view(5, 1601)
    reference = x * mask.noise(x)
    for buffer in (fresh, scratch):
        assert torch.equal(mask.dropped(x, buffer), reference)
        assert torch.equal(mask.drop_(x.clone()), reference)
    other = dropout.Mask(4, 0.05)  # a new draw of the same seed, first applied in place
    assert torch.equal(other.drop_(x.clone()), reference)
