"""The rest of the strategy × method matrix under torchrun, and a rank killed outright.

Marked slow (each torchrun launch costs ~15-30 s on 2 shared cores); the fast tier covers
DDP+LoRA (test_torchrun.py) and FSDP+full with a hung rank (test_distributed_fault.py);
here FSDP+DoRA and DDP+full with gradient accumulation, and a killed rank whose DDP
checkpoint is resumed under FSDP.
"""

import pytest

from tests.e2e.test_torchrun import assert_same_run, make_configs, torchrun, train_in_process

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy, method", [("fsdp", "dora"), ("ddp", "full")])
def test_matches_one_process_with_grad_accum(tmp_path, tiny_model_dir, strategy, method):
    # 2 processes × batch 1 × grad_accum 2: the no-sync micro-batch of DDP and of FSDP
    ref_cfg, dist_cfg = make_configs(tmp_path, tiny_model_dir, method, strategy, accum=2)
    proc = torchrun(dist_cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(train_in_process(ref_cfg), tmp_path / "dist")


def test_killed_rank_stops_run_and_ddp_checkpoint_resumes_under_fsdp(tmp_path, tiny_model_dir):
    ref_cfg, dist_cfg = make_configs(tmp_path, tiny_model_dir, "lora", "ddp", dist_timeout_s=60)
    proc = torchrun(dist_cfg, tmp_path, env={"TUNESMITH_TEST_FAULT": "1:3:exit"}, timeout=240)
    assert proc.returncode != 0
    assert "tunesmith: error: rank 0 of 2: another process died; the run is stopped" in proc.stderr, proc.stderr[-3000:]
    ckpts = tmp_path / "dist" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    # A DDP checkpoint resumed by FSDP: whole tensors from disk become each rank's shards.
    proc = torchrun(dist_cfg, tmp_path, "train.resume=auto", "train.strategy=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(train_in_process(ref_cfg), tmp_path / "dist")
