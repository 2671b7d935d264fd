"""Two gloo processes under torchrun train the same run as one process with the same global batch.

One process with batch_size 4 and two processes with batch_size 2 must give the same loss
curve and the same final weights (within 1e-5, fp32, dropout 0), and only rank 0 writes.
The helpers here are shared by the other `test_distributed_*` files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from safetensors.torch import load_file

from tests.tiny import write_config, write_qa_jsonl

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TOL = 1e-5


def make_configs(tmp_path: Path, model_dir, method: str, strategy: str, accum: int = 1, **train) -> tuple[Path, Path]:
    """(reference config: 1 process × batch 4, distributed config: 2 processes × batch 2/accum × accum)."""
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    # lr 2e-3 for full: Adam turns a 1e-7 gradient difference into lr-sized steps on near-zero gradients
    base = {
        "max_steps": 4,
        "save_every": 2,
        "eval_every": 2,
        "warmup_steps": 1,
        "lr": 1e-2 if method != "full" else 2e-3,
        **train,
    }
    # 6 validation rows: 3 batches of 2 over 2 ranks, so one rank pads its last eval forward
    common = {"data": {"packing": False, "val_fraction": 0.2}, "adapter": {"method": method, "dropout": 0.0}}
    ref = write_config(
        tmp_path / "ref.yaml", model_dir, data, tmp_path / "ref", train={**base, "batch_size": 4}, **common
    )
    dist = write_config(
        tmp_path / "dist.yaml",
        model_dir,
        data,
        tmp_path / "dist",
        train={**base, "batch_size": 2 // accum, "grad_accum": accum, "strategy": strategy},
        **common,
    )
    return ref, dist


def train_in_process(cfg_path: Path, *overrides: str) -> Path:
    from tunesmith.config import load_config
    from tunesmith.train.loop import run_training

    cfg = load_config(cfg_path, list(overrides))
    run_training(cfg)
    return Path(cfg.train.output_dir)


def torchrun(cfg_path: Path, tmp_path: Path, *overrides: str, env: dict | None = None, timeout: int = 150):
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "tunesmith.cli", "train", str(cfg_path), *overrides]
    try:
        return _run_group(cmd, env, timeout)
    except subprocess.TimeoutExpired as err:
        # Seen once in CI (1 of ~10 launches): a 2-process launch that normally takes ~20 s hung
        # with no output. Root cause not found yet; one relaunch keeps the suite informative, and
        # a second hang still fails. The relaunch resumes from whatever the first one
        # checkpointed, which the equality checks then cover like any resume.
        print(f"torchrun timed out after {timeout}s; relaunching once. partial stderr: {err.stderr!r:.2000}")
        return _run_group(cmd + ["train.resume=auto"], env, timeout)


def _run_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group; on a timeout kill it and every worker it started.
    Workers may sit in sessions of their own (outside the group), so they are found by a marker
    in their environment; a surviving worker would hold the output pipes open forever."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "TUNESMITH_TEST_LAUNCH": marker},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_marked(marker)
        out, err = proc.communicate(timeout=60)
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_marked(marker: str) -> None:
    needle = f"TUNESMITH_TEST_LAUNCH={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def losses(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def weights(out: Path) -> dict:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(out / name)


def assert_same_run(ref: Path, other: Path) -> None:
    for key in ("loss", "val_loss"):
        a, b = losses(ref, key), losses(other, key)
        assert [s for s, _ in a] == [s for s, _ in b] and a
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= TOL, (key, a, b)
    wa, wb = weights(ref), weights(other)
    assert set(wa) == set(wb)  # same file format as a single-process run
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= TOL, diff


def test_ddp_lora_matches_one_process(tmp_path, tiny_model_dir):
    ref_cfg, dist_cfg = make_configs(tmp_path, tiny_model_dir, "lora", "ddp")
    ref = train_in_process(ref_cfg)
    proc = torchrun(dist_cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "dist"
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]  # one writer: rank 0
    assert proc.stdout.count("tunesmith: done") == 1
    assert_same_run(ref, out)
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["global_batch"] == 4 and state["world_size"] == 2 and state["offset"] == 16
