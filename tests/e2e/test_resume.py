"""Kill training with SIGKILL mid-run, resume it, and get bit-identical final weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.tiny import write_config, write_qa_jsonl

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")


def start(cfg_path, env, *extra):
    return subprocess.Popen(
        [EXE, "train", str(cfg_path), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize(
    "method,weights",
    [("lora", "adapter_model.safetensors"), ("dora", "adapter_model.safetensors"), ("full", "model.safetensors")],
)
def test_sigkill_and_resume_is_bit_exact(tmp_path, tiny_model_dir, method, weights):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home")}
    settings = dict(
        adapter={"method": method, "dropout": 0.1},  # dropout makes the RNG state matter
        train={"max_steps": 60, "save_every": 3, "keep_last": 2, "lr": 1e-3, "progress": False},
    )
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_model_dir, data, tmp_path / "ref", **settings)
    cut_cfg = write_config(tmp_path / "cut.yaml", tiny_model_dir, data, tmp_path / "cut", **settings)

    ref = start(ref_cfg, env)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()

    proc = start(cut_cfg, env)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-00000006").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "run.json").exists(), "training finished before the kill; the test proved nothing"
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert killed_at < 60

    resumed = start(cut_cfg, env, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resuming at step" in out

    a = load_file(tmp_path / "ref" / weights)
    b = load_file(tmp_path / "cut" / weights)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume"
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    cut_rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()

    def strip(rows):
        return [{k: v for k, v in json.loads(r).items() if k not in ("tok_per_s", "step_s", "elapsed_s")} for r in rows]

    assert strip(ref_rows) == strip(cut_rows)  # the resumed log reads like one run
