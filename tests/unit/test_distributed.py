"""Global-batch data order, the resume rule across process counts, config keys, failure lines.

The multi-process behaviour itself is tested end to end under torchrun (tests/e2e/test_torchrun.py,
test_distributed_*.py); these pin the pieces that make it right, in milliseconds.
"""

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import Dist, failure_line, inject_fault, setup
from tunesmith.train.loop import RowStream


def _steps(n_rows, batch, accum, world, n_steps, seed=3):
    """The set of global rows in each optimizer step, over all ranks."""
    streams = [RowStream(n_rows, batch, seed, Dist(r, world)) for r in range(world)]
    out = []
    for _ in range(n_steps):
        per_rank = [s.next_step(accum) for s in streams]
        assert len({len(m) for m in per_rank}) == 1  # every rank runs as many micro-batches
        assert len({sum(len(b) for b in m) for m in per_rank}) == 1  # and as many rows
        assert all(b for m in per_rank for b in m)  # never an empty micro-batch
        out.append(sorted(i for m in per_rank for b in m for i in b))
    return out, streams[0]


@pytest.mark.parametrize("n_rows", [12, 10])
def test_same_global_batch_same_rows_per_step(n_rows):
    one, _ = _steps(n_rows, 4, 1, 1, 7)
    assert _steps(n_rows, 2, 1, 2, 7)[0] == one  # 2 processes × 2
    assert _steps(n_rows, 2, 2, 1, 7)[0] == one  # 1 process × 2 × grad_accum 2
    assert _steps(n_rows, 1, 2, 2, 7)[0] == one  # 2 processes × 1 × grad_accum 2


def test_epoch_is_cut_to_a_multiple_of_world_and_steps_stay_in_their_epoch():
    steps, stream = _steps(11, 2, 2, 2, 3)  # 11 rows, 2 ranks: 10 per epoch, 8 per step
    assert [len(s) for s in steps] == [8, 2, 8]  # the step ending epoch 0 is short
    assert len(set(steps[0] + steps[1])) == 10
    assert stream.epoch == 1 and stream.offset == 8


def test_offset_is_global_so_a_checkpoint_resumes_with_another_world():
    _, two = _steps(12, 2, 1, 2, 2)  # 2 steps × 4 rows
    one = RowStream(12, 4, 3, Dist(), two.epoch, two.offset)
    ref, _ = _steps(12, 4, 1, 1, 3)
    assert sorted(one.next()) == ref[2]


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt, sched


def test_resume_refuses_another_global_batch_before_changing_anything(tmp_path):
    model, opt, sched = _toy()
    state = {"epoch": 0, "offset": 8, "tokens_seen": 0, "global_batch": 8, "world_size": 2}
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, state, keep_last=2)
    other, other_opt, other_sched = _toy()
    with torch.no_grad():
        other.weight.zero_()
    with pytest.raises(UserError, match=r"global batch of 8 rows .*2 process.*this run has 4"):
        ckpt.load_checkpoint(path, other, other_opt, other_sched, global_batch=4)
    assert float(other.weight.detach().abs().sum()) == 0.0  # untouched
    loaded = ckpt.load_checkpoint(path, other, other_opt, other_sched, global_batch=8)
    assert loaded["offset"] == 8 and torch.equal(other.weight, model.weight)


def test_non_writing_rank_writes_nothing(tmp_path):
    model, opt, sched = _toy()
    assert ckpt.save_checkpoint(tmp_path / "c", 1, model, opt, sched, {}, 2, write=False) is None
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "override, key", [("train.strategy=zero3", "train.strategy"), ("train.dist_timeout_s=0", "train.dist_timeout_s")]
)
def test_distributed_config_keys_are_validated(override, key):
    with pytest.raises(UserError, match=key):
        load_config(None, [override])
    cfg = load_config(None, ["train.strategy=fsdp", "train.dist_timeout_s=30"])
    assert cfg.train.strategy == "fsdp" and cfg.train.dist_timeout_s == 30.0


def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = setup(torch.device("cpu"), "fsdp", 5)
    assert not dist.enabled and dist.main and dist.strategy == "fsdp"
    assert failure_line(RuntimeError("Timed out waiting 10000ms"), 5) is None  # no process group: not ours
    monkeypatch.setenv("TUNESMITH_TEST_FAULT", "1:3:exit")
    inject_fault(dist, 3)  # names rank 1: rank 0 goes on
