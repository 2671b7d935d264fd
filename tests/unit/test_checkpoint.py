"""Checkpoints: atomic directory writes, pruning, exact restore of weights/optimizer/RNG."""

import random

import torch

from tunesmith.train import checkpoint as ckpt


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def train_step(model, opt, sched):
    loss = model(torch.randn(3, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_save_load_exact(tmp_path):
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"epoch": 1, "offset": 7}, keep_last=2)
    assert path.name == "step-00000003"
    assert set(p.name for p in path.iterdir()) == {
        "trainable.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "state.json",
        "manifest.json",
    }
    # only trainable tensors are stored
    from safetensors.torch import load_file

    assert set(load_file(path / "trainable.safetensors")) == {"0.bias", "1.weight", "1.bias"}
    random.random()
    train_step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_py = random.random()

    model2, opt2, sched2 = make()
    model2[0].weight.data.copy_(model[0].weight.data)  # frozen weights come from the base model
    state = ckpt.load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 3 and state["epoch"] == 1 and state["offset"] == 7
    random.random()
    train_step(model2, opt2, sched2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert random.random() == expected_py


def test_prune_and_latest_ignore_temp(tmp_path):
    model, opt, sched = make()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep_last=2)
    (tmp_path / ".step-00000009.tmp-123").mkdir()  # a checkpoint cut off by a kill
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["step-00000002", "step-00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
