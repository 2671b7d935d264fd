"""A rank that hangs stops the whole torchrun within train.dist_timeout_s, with one clear line;
the last checkpoint is intact and resumes with a different number of processes.

FSDP, full fine-tuning, 2 processes × batch 2: rank 1 hangs before step 3 (the documented
TUNESMITH_TEST_FAULT hook), after the step-2 checkpoint. Resuming that checkpoint in one
process with grad_accum 2 (same global batch) must end exactly where an uninterrupted
one-process run ends; resuming with another global batch is refused with one line.
"""

import json
import time

import pytest

from tests.e2e.test_torchrun import assert_same_run, make_configs, torchrun, train_in_process
from tunesmith.errors import UserError

TIMEOUT_S = 10


def test_hung_rank_stops_run_and_checkpoint_resumes_on_one_process(tmp_path, tiny_model_dir):
    ref_cfg, dist_cfg = make_configs(tmp_path, tiny_model_dir, "full", "fsdp", dist_timeout_s=TIMEOUT_S)
    started = time.monotonic()
    proc = torchrun(dist_cfg, tmp_path, env={"TUNESMITH_TEST_FAULT": "1:3:hang"}, timeout=240)
    wall = time.monotonic() - started
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tunesmith: error: rank 0 of 2")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"another process stopped answering for train.dist_timeout_s={TIMEOUT_S};" in lines[0]
    assert "step-00000002" in lines[0] and "train.resume=auto" in lines[0]
    assert wall < 120, wall  # the timeout, not torchrun's or the test's, ended it

    out = tmp_path / "dist"
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # no half-written step 3
    assert not (out / "run.json").exists()
    state = json.loads((ckpts / "step-00000002" / "state.json").read_text())
    assert state["global_batch"] == 4 and state["world_size"] == 2

    # Another global batch (1 process × 2 rows) is refused before anything is written.
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="global batch of 4 rows"):
        train_in_process(dist_cfg, "train.resume=auto")
    assert (out / "metrics.jsonl").read_text() == before

    # 1 process × 2 rows × grad_accum 2 continues the run; it ends as the uninterrupted one does.
    ref = train_in_process(ref_cfg)
    train_in_process(dist_cfg, "train.resume=auto", "train.grad_accum=2")
    assert_same_run(ref, out)
