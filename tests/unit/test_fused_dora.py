"""The fused DoRA node (`tunesmith.adapters.fused_dora`) is PEFT's DoRA: the same output and the same
gradients for x, A, B, the magnitude and the bias (fp32 noise), at dropout 0 and under LoRA dropout's
masks; on a bare layer with a bias, on a tiny Llama layer by layer and through the q/k/v, gate/up
and SwiGLU+down nodes; and a short `adapter.method=dora` run trains the same weights with the fused
path on and off (`adapter.fused`). Its adapter files are PEFT's (merge, export: test_merge.py,
test_gguf_lora.py); kill-and-resume: tests/e2e/test_resume.py."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from tests.tiny import make_tiny_model, write_config, write_qa_jsonl
from tests.unit.test_bf16_compute import _close_in_bf16
from tests.unit.test_lora_dropout import SeededDropout
from tests.unit.test_packing import PAD, assert_same, loss_and_grads, samples_for
from tunesmith.adapters.dropout import Mask
from tunesmith.adapters.fused_dora import DoraLinearFn, weight_norm
from tunesmith.adapters.fused_lora import FusedLoraLinear
from tunesmith.adapters.methods import apply_method
from tunesmith.config import AdapterConfig, load_config
from tunesmith.data.packing import unpacked
from tunesmith.train.kernels import attach, groups, mlp
from tunesmith.train.kernels.attention import flatten


def _perturb(model, seed=1):
    """Random B and a magnitude away from the weight norm: every gradient path non-trivial."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        elif "lora_magnitude_vector" in name:
            with torch.no_grad():
                p.mul_(1 + 0.2 * torch.randn_like(p))


def _counting(monkeypatch) -> dict:
    calls = {"layer": 0, "group": 0, "mlp": 0}
    for key, fn in (("layer", DoraLinearFn), ("group", groups.GroupLoraFn), ("mlp", mlp.SwiGLUDownFn)):
        original = fn.apply

        def apply(*args, key=key, original=original):
            calls[key] += 1
            return original(*args)

        monkeypatch.setattr(fn, "apply", apply)
    return calls


@pytest.mark.parametrize("mask", [None, Mask(seed=123, p=0.3)])
def test_dora_function_gradients(mask):
    torch.manual_seed(0)
    t = lambda *s, grad=True: torch.randn(*s, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    x, w, bias, a, b = t(2, 5, 6), t(4, 6, grad=False), t(4), t(3, 6), t(4, 3)
    norm = weight_norm(w, a, b, 0.7)
    magnitude = (norm * (1 + 0.3 * torch.randn(4, dtype=torch.float64))).requires_grad_()
    torch.autograd.gradcheck(lambda *v: DoraLinearFn.apply(*v, norm, 0.7, mask), (x, w, bias, a, b, magnitude))
    y = DoraLinearFn.apply(x, w, bias, a, b, magnitude, norm, 0.7, mask)
    d = x if mask is None else x * mask.noise(x)
    r = magnitude / torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(y, x @ w.T + bias + (r - 1) * (d @ w.T) + r * (0.7 * (d @ a.T) @ b.T))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 12, bias=True)

    def forward(self, x):
        return self.proj(x)


def _dora_net(fused: bool, p: float):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["proj"], use_dora=True)
    if fused:
        cfg._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    model = get_peft_model(Net(), cfg)
    _perturb(model)
    return model.train()


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_fused_dora_layer_is_peft_dora(p, monkeypatch):
    """Output and gradients of x, A, B, the magnitude and the bias, against PEFT's own forward."""
    peft, fused = _dora_net(False, p), _dora_net(True, p)
    layer = fused.base_model.model.proj
    assert isinstance(layer, FusedLoraLinear) and layer.is_dora("default")
    assert not isinstance(peft.base_model.model.proj, FusedLoraLinear)
    if p:
        peft.base_model.model.proj.lora_dropout["default"] = SeededDropout(p)  # the masks the fused node draws
    calls = _counting(monkeypatch)
    results = []
    for model in (fused, peft):
        torch.manual_seed(5)
        x = torch.randn(3, 7, 16, requires_grad=True)
        torch.manual_seed(7)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        grads = {n: q.grad for n, q in model.named_parameters() if q.requires_grad}
        results.append((y.detach(), x.grad, grads))
    assert calls["layer"] == 1
    (y1, gx1, g1), (y2, gx2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and any("lora_magnitude_vector" in n for n in g1)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if p:  # dropout is on: other masks give another output
        torch.manual_seed(8)
        assert not torch.allclose(fused(x), y1)


def test_the_kept_row_norms_follow_the_base_weight():
    """‖W‖² per row is kept between forwards (W is frozen) and recomputed once W changes in place."""
    from tunesmith.adapters.fused_dora import weight_norm

    layer = _dora_net(True, 0.0).base_model.model.proj
    a, b, w = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight
    for _ in range(2):
        _, norm = layer.dora_operands("default")
        torch.testing.assert_close(norm, weight_norm(w, a, b, layer.scaling["default"]), rtol=1e-6, atol=0)
        torch.testing.assert_close(norm, (w + layer.scaling["default"] * b @ a).norm(dim=1), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            w.mul_(1.5)  # a merge or any in-place change: a new version of W


def _llama(tok, fused: bool, p: float = 0.0, frozen: str = "fp32"):
    adapter = AdapterConfig(method="dora", rank=4, alpha=8, dropout=p, fused=fused)
    model = apply_method(make_tiny_model(len(tok)), adapter, frozen)
    _perturb(model)
    return model.train()


@pytest.mark.parametrize("nodes,p", [("layers", 0.0), ("groups+mlp", 0.0), ("groups+mlp", 0.05)])
def test_fused_dora_model_is_peft_dora(tiny_tokenizer, nodes, p, monkeypatch):
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    peft = _llama(tiny_tokenizer, fused=False, p=p)
    assert not any(isinstance(m, FusedLoraLinear) for m in peft.modules())
    if p:
        for module in peft.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = SeededDropout(p)
    attach(peft, varlen=True)
    fused = _llama(tiny_tokenizer, fused=True, p=p)
    attach(fused, varlen=True, mlp=nodes != "layers", groups=nodes != "layers")
    calls = _counting(monkeypatch)
    results = []
    for model in (fused, peft):
        torch.manual_seed(7)
        results.append(loss_and_grads(model, batches))
    assert_same(results[0], results[1])
    assert any("lora_magnitude_vector" in name for name in results[0][1])
    layers = 2
    if nodes == "layers" or p:  # DoRA under dropout: each projection its own fused DoRA node
        assert calls == {"layer": 7 * layers, "group": 0, "mlp": 0}
    else:  # q/k/v and gate/up grouped, down inside the SwiGLU node, o alone
        assert calls == {"layer": layers, "group": 2 * layers, "mlp": layers}


def test_bf16_dora_over_a_bf16_base_stays_close_to_fp32(tiny_tokenizer, monkeypatch):
    """Under bf16 autocast the DoRA nodes compute in bf16 (the norm in fp32): fp32 PEFT within bf16 rounding."""
    batches = [flatten(unpacked(samples_for(tiny_tokenizer, False), PAD))]
    peft = _llama(tiny_tokenizer, fused=False)
    attach(peft, varlen=True)
    reference = loss_and_grads(peft, batches)
    model = _llama(tiny_tokenizer, fused=True, frozen="bf16")
    attach(model, varlen=True, mlp=True, groups=True)
    calls = _counting(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batches)
    assert calls == {"layer": 2, "group": 4, "mlp": 2}
    assert loss == pytest.approx(reference[0], rel=1e-2)
    assert grads.keys() == reference[1].keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        _close_in_bf16(grad, reference[1][name], name)


def _train(tmp_path, model_dir, name, fused: bool) -> tuple:
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    adapter = {"method": "dora", "fused": fused}
    train = {"max_steps": 3, "lr": 1e-2, "warmup_steps": 0}
    cfg = write_config(tmp_path / f"{name}.yaml", model_dir, data, tmp_path / name, adapter=adapter, train=train)
    from tunesmith.train.loop import run_training

    result = run_training(load_config(cfg))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses, load_file(tmp_path / name / "adapter_model.safetensors"), result.model


def test_a_dora_run_trains_the_same_weights_fused_or_not(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    calls = _counting(monkeypatch)
    fused_losses, fused_weights, trained = _train(tmp_path, tiny_model_dir, "fused", fused=True)
    assert calls["layer"] and calls["group"] and calls["mlp"]
    taken = dict(calls)
    plain_losses, plain_weights, _ = _train(tmp_path, tiny_model_dir, "plain", fused=False)
    assert calls == taken  # adapter.fused=false: PEFT's own DoRA forward throughout
    assert len(fused_losses) == 3 and fused_losses == pytest.approx(plain_losses, abs=1e-5)
    assert fused_weights.keys() == plain_weights.keys()
    assert any("lora_magnitude_vector" in name for name in fused_weights)
    for name in fused_weights:
        torch.testing.assert_close(fused_weights[name], plain_weights[name], rtol=1e-4, atol=1e-5)
    # the saved adapter is PEFT's own DoRA adapter: it loads into a plain PEFT model and computes the same
    reloaded = PeftModel.from_pretrained(make_tiny_model(len(tiny_tokenizer)), tmp_path / "fused").eval()
    assert reloaded.peft_config["default"].use_dora
    assert not any(isinstance(m, FusedLoraLinear) for m in reloaded.modules())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
