"""The loop is rank-aware: two gloo processes under torchrun train one run, rank 0 writes it."""

import json
import os
import subprocess
import sys

from tests.tiny import write_config, write_qa_jsonl


def test_torchrun_two_processes(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=40)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, train={"max_steps": 4, "save_every": 2})
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "tunesmith.cli", "train", str(cfg)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: rank 0
    assert proc.stdout.count("tunesmith: done") == 1
    assert (out / "adapter_model.safetensors").is_file()
