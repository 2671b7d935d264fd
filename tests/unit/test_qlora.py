"""NF4 storage, QLoRA and the memory savers, on toy tensors and a tiny random Llama."""

import copy

import pytest
import torch

from tests.tiny import make_tiny_model
from tunesmith.adapters.methods import apply_method, count_parameters
from tunesmith.adapters.storage import NF4_LEVELS, FrozenEmbedding, FrozenLinear, quantize, storage_bytes
from tunesmith.config import AdapterConfig, load_config
from tunesmith.errors import UserError
from tunesmith.train.loss import token_loss


def _weight(shape=(96, 128), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_nf4_levels_round_trip_exactly():
    w = (NF4_LEVELS.repeat(8) * 0.5).view(8, 16)  # every block's absmax is 0.5
    assert torch.equal(quantize(w, 64, double_quant=False).dequantize(), w)


@pytest.mark.parametrize("double_quant,rel_err,bits", [(False, 0.092557, 4.5), (True, 0.092594, 4.1302)])
def test_nf4_round_trip_error_and_size(double_quant, rel_err, bits):
    w = _weight()
    q = quantize(w, 64, double_quant)
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == torch.float32
    err = (back - w).norm() / w.norm()
    assert abs(float(err) - rel_err) < 1e-5, float(err)
    # worst case: half the widest gap between levels (-1 → -0.696: 0.152) times the block's absmax (+ scale rounding)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    bound = 0.1520 * absmax * (1.01 if double_quant else 1.0) + 1e-7
    assert ((back - w).view(-1, 64).abs() <= bound).all()
    assert abs(q.nbytes() * 8 / w.numel() - bits) < 1e-3


def test_nf4_pads_odd_shapes_and_zero_blocks():
    w = _weight((3, 7))
    w[0] = 0.0
    back = quantize(w, 64).dequantize()
    assert back.shape == (3, 7)
    assert torch.equal(back[0], torch.zeros(7))
    assert (back - w).abs().max() < 0.1520 * w.abs().max() * 1.01


def test_frozen_linear_forward_backward_match_dequantized_weight():
    w, bias = _weight((48, 64)), torch.randn(48) * 0.1
    q = quantize(w, 32)
    layer = FrozenLinear(q, bias)
    x = torch.randn(5, 64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    ref = torch.nn.functional.linear(ref_x, q.dequantize(), bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    (out**2).sum().backward()
    (ref**2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    # the graph keeps the input only: no [48, 64] full-precision weight waits for backward
    assert torch.Size([48, 64]) not in saved and torch.Size([64, 48]) not in saved


def test_frozen_embedding_decodes_rows():
    w = _weight((10, 64))
    q = quantize(w, 32)
    ids = torch.tensor([[3, 0, 9], [9, 9, 1]])
    torch.testing.assert_close(FrozenEmbedding(q)(ids), q.dequantize()[ids], rtol=0, atol=0)


def _lora_cfg(method="lora", **kw):
    return AdapterConfig(method=method, rank=4, alpha=8.0, **kw)


def _batch(vocab=300):
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100
    return ids, labels


def _randomise_lora(model):
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05


def test_qlora_equals_lora_on_dequantized_weights():
    base = make_tiny_model(400)
    torch.manual_seed(0)
    qlora = apply_method(copy.deepcopy(base), _lora_cfg("qlora", quant_block_size=32))
    # the same model with every quantized linear's weight replaced by its dequantized value
    ref_base = copy.deepcopy(base)
    stored = {
        n: m.storage.dequantize() for n, m in qlora.get_base_model().named_modules() if isinstance(m, FrozenLinear)
    }
    assert len(stored) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for name, w in stored.items():
        ref_base.get_submodule(name.replace(".base_layer", "")).weight.data = w
    torch.manual_seed(0)
    lora = apply_method(ref_base, _lora_cfg())
    _randomise_lora(qlora)
    _randomise_lora(lora)
    ids, labels = _batch()
    (q_loss, _), (l_loss, _) = token_loss(qlora, ids, labels), token_loss(lora, ids, labels)
    torch.testing.assert_close(q_loss, l_loss, rtol=1e-5, atol=1e-5)
    q_loss.backward()
    l_loss.backward()
    q_grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    l_grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert q_grads.keys() == l_grads.keys() and len(q_grads) == 28
    for name in q_grads:
        torch.testing.assert_close(q_grads[name], l_grads[name], rtol=1e-4, atol=1e-6)
    trainable, total = count_parameters(qlora)
    assert trainable == sum(p.numel() for p in l_grads.values())
    assert total == count_parameters(lora)[1]


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_gradient_checkpointing_same_loss_and_grads_for_every_method(method):
    ids, labels = _batch()
    results = []
    for checkpointing in (False, True):
        model = make_tiny_model(400)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = apply_method(model, _lora_cfg(method, quant_block_size=32))
        model.train()
        loss, _ = token_loss(model, ids, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, model))
    (loss_a, grads_a, _), (loss_b, grads_b, model) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)
    embed = model.get_input_embeddings()
    if method == "full":
        assert embed.weight.grad is not None
    else:  # frozen embeddings: no gradient is computed or stored for them
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_frozen_storage_halves_base_and_stays_close(method):
    ids, labels = _batch()
    ref = apply_method(make_tiny_model(400), _lora_cfg(method))
    half = apply_method(make_tiny_model(400), _lora_cfg(method), frozen_dtype="bf16")
    assert isinstance(half.get_base_model().get_input_embeddings(), FrozenEmbedding)
    assert storage_bytes(half) < 0.52 * storage_bytes(ref)
    (a, _), (b, _) = token_loss(ref, ids, labels), token_loss(half, ids, labels)
    assert abs(a.item() - b.item()) / a.item() < 2e-3, (a.item(), b.item())
    b.backward()
    assert all(p.grad is not None for p in half.parameters() if p.requires_grad)


def test_qlora_with_quantized_embeddings_shares_the_tied_head():
    model = apply_method(make_tiny_model(400), _lora_cfg("qlora", quantize_embeddings=True, quant_block_size=32))
    inner = model.get_base_model()
    assert inner.get_output_embeddings().storage is inner.get_input_embeddings().storage
    full_bytes = sum(p.numel() * 4 for p in make_tiny_model(400).parameters())
    assert storage_bytes(model) < 0.2 * full_bytes
    loss, _ = token_loss(model, *_batch())
    loss.backward()


def test_config_accepts_qlora_and_checks_its_keys():
    cfg = load_config(None, ["adapter.method=qlora", "adapter.quant_block_size=128", "train.frozen_dtype=bf16"])
    assert (cfg.adapter.method, cfg.adapter.quant_block_size, cfg.train.frozen_dtype) == ("qlora", 128, "bf16")
    with pytest.raises(UserError, match="adapter.quant_block_size"):
        load_config(None, ["adapter.quant_block_size=63"])
    with pytest.raises(UserError, match="train.frozen_dtype"):
        load_config(None, ["train.frozen_dtype=int8"])


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_chunked_loss_matches_full_logits_and_bounds_head_rows(method, monkeypatch):
    import tunesmith.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "MODULE_CHUNK", 8)  # 28 labelled tokens → chunks of 8
    monkeypatch.setattr(loss_mod, "CHUNK", 8)
    torch.manual_seed(0)
    model = apply_method(make_tiny_model(400), _lora_cfg(method, quantize_embeddings=True, quant_block_size=32))
    ids, labels = _batch()
    head = model.get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))  # NF4 head
    plain_logits = loss_mod._logits
    monkeypatch.setattr(loss_mod, "_logits", lambda h, w, out: rows.append(h.shape[0]) or plain_logits(h, w, out))
    loss, n = token_loss(model, ids, labels)
    loss.backward()
    handle.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert n == 28 and rows and max(rows) <= 8  # the head never sees more than one chunk of rows
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    keep = labels[:, 1:] != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep], reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- int4 (asymmetric, GGUF Q4_1's layout)


def _q4_1_grid(rows=48, width=64, block=32, seed=0):
    """A weight as a Q4_1 GGUF dequantizes it: per block of 32, fp16 minimum + fp16 step × q, q in 0..15
    (the quantizer maps the block's min to 0 and its max to 15, so both occur)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = rows * width // block
    q = torch.randint(0, 16, (n_blocks, block), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15
    step = (torch.rand(n_blocks, 1, generator=g) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(n_blocks, 1, generator=g) * 0.08).half().float()
    return (low + step * q).view(rows, width)


def test_int4_stores_a_q4_1_grid_exactly_and_nf4_does_not():
    from tunesmith.adapters.storage import quantize_int4

    w = _q4_1_grid()
    assert torch.equal(quantize_int4(w, 32).dequantize(), w)
    assert (quantize(w, 32, double_quant=False).dequantize() - w).abs().max() > 1e-3  # NF4 rounds it again


def test_int4_error_bound_size_and_rows():
    from tunesmith.adapters.storage import quantize_int4

    w = _weight((96, 128))
    q = quantize_int4(w, 32)
    back = q.dequantize()
    blocks, err = w.view(-1, 32), (back - w).view(-1, 32).abs()
    step = (blocks.amax(1, keepdim=True) - blocks.amin(1, keepdim=True)) / 15
    assert (err <= step * 0.501 + 2e-3 * blocks.abs().amax(1, keepdim=True)).all()  # half a step (+ fp16 rounding)
    assert q.nbytes() * 8 / w.numel() == 5.0  # 4 bits + fp16 minimum and step per 32
    ids = torch.tensor([[3, 0], [95, 3]])
    assert torch.equal(q.rows(ids), back[ids])
    odd = _weight((7, 9))  # pads the last block
    assert (quantize_int4(odd, 32).dequantize() - odd).abs().max() < 0.01


def test_qlora_with_int4_trains_and_saves_a_plain_adapter(tmp_path):
    torch.manual_seed(0)
    model = apply_method(make_tiny_model(400), _lora_cfg("qlora", quant_type="int4", quant_block_size=32))
    assert any(type(m).__name__ == "Int4Storage" for m in model.modules())
    loss, _ = token_loss(model, *_batch())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(UserError, match="adapter.quant_type"):
        load_config(None, ["adapter.quant_type=fp4"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_into_reused_buffers_are_the_plain_decode_bit_for_bit(dtype):
    from tunesmith.adapters.storage import _INT_PAIR_LUT, _PAIR_LUT, quantize_int4
    from tunesmith.train.kernels.scratch import release, scratch

    release()
    w = _weight((48, 96))
    for q in (quantize(w, 32), quantize(w, 64, double_quant=False)):
        # the decode as it was before buffers: one gather through the pair table, times the scales
        ref = (torch.nn.functional.embedding(q.codes.int(), _PAIR_LUT).view(-1, 32 if q.absmax is None else 64)
               * q.scales().reshape(-1, 1)).to(dtype).view(48, 96)  # fmt: skip
        assert torch.equal(q.dequantize(dtype, scratch), ref) and torch.equal(q.dequantize(dtype), ref)
    q4 = quantize_int4(w, 32)
    pairs = torch.nn.functional.embedding(q4.codes.int(), _INT_PAIR_LUT).view(-1, 32)
    ref = torch.addcmul(q4.minimum.float()[:, None], pairs, q4.step.float()[:, None]).to(dtype).view(48, 96)
    first = q4.dequantize(dtype, scratch)
    assert torch.equal(first, ref)
    quantize(_weight((8, 32), seed=1), 32).dequantize(dtype, scratch)  # another layer reuses the buffers
    assert q4.dequantize(dtype, scratch).data_ptr() == first.data_ptr()


def test_qlora_training_over_reused_decode_buffers_is_bit_identical():
    from tunesmith.adapters.storage import fresh
    from tunesmith.train.kernels import attach
    from tunesmith.train.kernels.scratch import scratch

    base = make_tiny_model(400)
    losses = []
    for reuse in (False, True):
        torch.manual_seed(0)
        model = apply_method(copy.deepcopy(base), _lora_cfg("qlora", quant_block_size=32))
        _randomise_lora(model)
        fast = attach(model)
        if reuse:
            fast.reuse_buffers()
            frozen = [m for m in fast.buffered if type(m) is FrozenLinear]  # and the LoRA layers over them
            assert len(frozen) == 14 and len(fast.buffered) == 28 and all(m.buffer is scratch for m in fast.buffered)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, labels = _batch()
        run = []
        for _ in range(3):
            loss, _ = token_loss(model, ids, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        layers = list(fast.buffered)
        fast.restore()
        assert all(m.buffer is fresh for m in layers)
        losses.append(run)
    assert losses[0] == losses[1] and losses[0][0] != losses[0][-1]


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_qlora_is_pefts_qlora(autocast):
    """The fused LoRA node over a 4-bit base (decoded in forward and again in backward) gives PEFT's
    own LoRA forward over the same `FrozenLinear`: loss and every adapter gradient, fp32 and bf16."""
    from tunesmith.adapters.fused_lora import FusedLoraLinear

    base = make_tiny_model(400)
    results = []
    for fused in (True, False):
        torch.manual_seed(0)  # PEFT draws A
        model = apply_method(copy.deepcopy(base), _lora_cfg("qlora", fused=fused))
        _randomise_lora(model)
        layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
        assert len(layers) == (14 if fused else 0)
        if fused:
            x = torch.randn(3, layers[0].in_features)
            assert all(m._fused_adapter(x, (), {}) == "default" for m in layers[:1])
        ids, labels = _batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = token_loss(model, ids, labels)
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    (loss_f, g_f), (loss_p, g_p) = results
    tol = 2e-2 if autocast else 1e-5
    assert loss_f == pytest.approx(loss_p, rel=tol / 10 if autocast else 1e-6)
    assert g_f.keys() == g_p.keys() and len(g_f) == 28
    for name in g_f:
        scale = g_p[name].abs().max().item() or 1.0
        torch.testing.assert_close(g_f[name], g_p[name], atol=tol * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
