"""The pieces of output safety: the lock, killed-write sweeps, manifests, input/output checks,
checkpoint pruning that keeps the last healthy one, and the divergence guard's rule."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.io import OutputLock, check_not_input, manifest_problem, sweep_temp, write_manifest
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import Dist
from tunesmith.train.divergence import Guard


def test_lock_refuses_another_process_names_its_pid_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    with OutputLock(target):
        with OutputLock(target):  # re-entrant in one process
            assert (target / ".tunesmith.lock").read_text().strip() == str(os.getpid())
        code = f"from tunesmith.io import OutputLock\nwith OutputLock({str(target)!r}): pass"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert f"being written by another tunesmith process (pid {os.getpid()})" in other.stderr
        assert (target / ".tunesmith.lock").is_file()  # still held after the inner release
    assert not target.exists()  # made by the lock, left empty: removed again


def test_lock_beside(tmp_path):
    file = tmp_path / "model.gguf"
    with OutputLock(file, beside=True):
        assert (tmp_path / ".model.gguf.tunesmith.lock").is_file()
    assert list(tmp_path.iterdir()) == []


def test_lock_in_an_unwritable_dir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(UserError, match="cannot write there"):
            with OutputLock(ro / "run"):
                pass
    finally:
        ro.chmod(0o700)


def test_sweep_removes_leftovers_and_restores_an_orphaned_old(tmp_path):
    (tmp_path / ".step-00000004.tmp-11").mkdir()
    (tmp_path / ".run.json.tmp-12").write_text("{")
    (tmp_path / ".step-00000006.old-13").mkdir()  # killed between replace_dir's renames: step-6 is gone
    (tmp_path / ".step-00000006.old-13" / "state.json").write_text("{}")
    (tmp_path / ".step-00000002.old-14").mkdir()  # killed after: step-2 is there, this is the old copy
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "notes.tmp-1").write_text("the user's")
    swept = sweep_temp(tmp_path)
    assert len(swept) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp-1", "step-00000002", "step-00000006"]
    assert (tmp_path / "step-00000006" / "state.json").is_file()


def test_manifest_catches_missing_resized_and_changed_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abcd")
    (tmp_path / "b.json").write_text("{}")
    write_manifest(tmp_path)
    assert manifest_problem(tmp_path, ("a.bin",)) is None
    (tmp_path / "a.bin").write_bytes(b"abce")
    assert "a.bin does not match its SHA-256" in manifest_problem(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert "a.bin has 3 bytes, manifest.json says 4" in manifest_problem(tmp_path)
    (tmp_path / "b.json").unlink()
    assert manifest_problem(tmp_path).startswith(("a.bin", "b.json is missing"))


def test_output_may_not_be_or_hold_an_input(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="is the input"):
        check_not_input(run, [run])
    with pytest.raises(UserError, match="holds the input"):
        check_not_input(tmp_path, [run], key="out_dir")
    check_not_input(run / "export", [run])  # inside the input is fine
    check_not_input(tmp_path / "other", [run, "smollm2-135m-instruct", None])


def _make():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    model, opt, sched = _make()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"healthy": True}, keep_last=1)
    ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"healthy": True}, keep_last=1)
    ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"healthy": False}, keep_last=1)
    with torch.no_grad():
        model.weight.fill_(float("nan"))  # the weights themselves make a checkpoint unhealthy
    ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {"healthy": True}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]
    assert json.loads((tmp_path / "step-00000004" / "state.json").read_text())["healthy"] is False
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    # saving a step again swaps it in whole, leaving no temp or old copy behind
    ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]


def test_guard_rule():
    train = load_config(None, ["train.on_divergence=skip_step", "train.max_skipped_steps=1"]).train
    dist, log_v = Dist(), math.log(400)
    g = Guard(train, 400)
    assert g.check(1, 5.0, 1.0, dist, "cpu") == "ok" and g.healthy
    assert g.check(2, float("nan"), 1.0, dist, "cpu") == "skip" and g.skipped == 1 and not g.healthy
    assert g.check(3, 5.0, float("inf"), dist, "cpu") == "stop" and "step 3: the gradient norm is inf" in g.reason
    g = Guard(load_config(None, []).train, 400)
    assert [g.check(s, log_v * 1.005, 1e-7, dist, "cpu") for s in (1, 2, 3)] == ["ok", "ok", "stop"]
    g = Guard(load_config(None, []).train, 400)  # at ln V but still learning: no collapse
    assert {g.check(s, log_v, 1e-3, dist, "cpu") for s in range(1, 6)} == {"ok"}
    assert Guard(load_config(None, []).train, 400, scaled=True).check(1, 5.0, float("inf"), dist, "cpu") == "ok"
    with pytest.raises(UserError, match="train.on_divergence"):
        load_config(None, ["train.on_divergence=ignore"])


def _fake_checkpoint(path):
    path.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json"):
        (path / name).write_text("{}")
    write_manifest(path)
    return path


def test_explicit_resume_runs_the_output_dir_checks(tmp_path):
    from tunesmith.rundir import RunDir

    point = _fake_checkpoint(tmp_path / "elsewhere" / "step-00000004")
    cfg = load_config(None, [f"train.resume={point}", f"train.output_dir={tmp_path / 'new'}"])
    assert RunDir(tmp_path / "new").resume_point(cfg) == point  # a new dir: fine
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff")
    with pytest.raises(UserError, match="not empty and holds no tunesmith run"):
        RunDir(foreign).resume_point(cfg)
    other = tmp_path / "other-run"
    RunDir(other).save_config(load_config(None, ["train.lr=0.5"]))
    with pytest.raises(UserError, match="holds another run"):
        RunDir(other).resume_point(cfg)
    (point / "optimizer.pt").write_text("{}{}")
    with pytest.raises(UserError, match="not a complete checkpoint .optimizer.pt has 4 bytes"):
        RunDir(tmp_path / "new").resume_point(cfg)


def test_a_run_sweeps_only_its_own_leftovers(tmp_path):
    from tunesmith.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.save_config(load_config(None, []))
    (run.path / ".final-tmp-5").mkdir()
    (run.path / ".run.json.tmp-5").write_text("{")
    (run.path / ".q.tmp-6").mkdir()  # `quantize RUN --out RUN/q` writing at the same time
    run.checkpoints.mkdir()
    (run.checkpoints / ".step-00000002.tmp-5").mkdir()
    with run.writing():
        assert sorted(p.name for p in run.path.iterdir()) == [
            ".q.tmp-6",
            ".tunesmith.lock",
            "checkpoints",
            "tunesmith.yaml",
        ]
        assert list(run.checkpoints.iterdir()) == []
    assert not (run.path / ".tunesmith.lock").exists()
