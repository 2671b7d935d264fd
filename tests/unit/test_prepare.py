"""The training loop and `fit`'s probes prepare the same model: `loop.set_up` (pretrained weights)
and `fit.probe_model` (random weights, the same architecture) give the same module tree — types,
patched forwards, parameter and buffer names, shapes, dtypes and trainability — and, with the
loop's weights copied in, the same loss and gradients, for every method and the settings users type."""

import pytest
import torch
from transformers import AutoConfig

from tests.tiny import write_config, write_qa_jsonl
from tests.unit.test_packing import assert_same
from tunesmith.config import load_config
from tunesmith.train import fit
from tunesmith.train.loop import set_up
from tunesmith.train.loss import LossModule


def _tree(model) -> list:
    modules = [(n, type(m).__name__, "forward" in vars(m)) for n, m in model.named_modules()]
    params = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    buffers = [(n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()]
    return modules + params + buffers


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = LossModule(model)(**batch)
    (loss / n).backward()
    return (loss / n).item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "adapter,train",
    [
        ({"method": "full"}, {}),
        ({"method": "lora"}, {}),
        ({"method": "lora", "dropout": 0.05}, {"frozen_dtype": "bf16"}),  # a user's dropout; a bf16-stored base
        ({"method": "dora"}, {}),
        ({"method": "qlora"}, {}),
        ({"method": "lora"}, {"padding_free": False}),
    ],
)
def test_loop_and_fit_prepare_the_same_model(tmp_path, tiny_model_dir, adapter, train):
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run", adapter=adapter, train=train)
    cfg = load_config(path)
    run = set_up(cfg)
    with run.fast:
        loop_model = run.model
        _, frozen_dtype = fit._precision(cfg)
        hf = AutoConfig.from_pretrained(tiny_model_dir)
        probe = fit.probe_model(cfg, hf, hf.num_hidden_layers, frozen_dtype)
        with probe:
            assert _tree(probe.model) == _tree(loop_model)
            assert probe.flat == run.fast.flat and len(probe.groups) == len(run.fast.groups)
            with torch.no_grad():  # the loop's weights into the probe (non-persistent buffers too)
                mine = dict(probe.model.named_parameters()) | dict(probe.model.named_buffers())
                for name, tensor in [*loop_model.named_parameters(), *loop_model.named_buffers()]:
                    mine[name].copy_(tensor)
            batch = run.make_batch(run.train_rows[:2])
            for m in (loop_model, probe.model):
                m.eval()  # dropout off, so the two forwards draw nothing at random
            assert_same(_loss_and_grads(probe.model, batch), _loss_and_grads(loop_model, batch), tol=0)
