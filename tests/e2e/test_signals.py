"""SIGTERM a real `tunesmith train` mid-run: a checkpoint at the next step boundary, exit 143, one line
with the exact --resume command; resuming ends bit-identical to an uninterrupted run. `--resume` with
nothing to resume says it starts fresh."""

import os
import shlex
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from tests.tiny import write_config, write_qa_jsonl

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")
# default config otherwise: no save_every, the default save_every_minutes (10), progress bar on
SETTINGS = dict(adapter={"dropout": 0.1}, train={"max_steps": 40, "lr": 1e-3, "progress": True})


def _run(args, env, cwd):
    return subprocess.run([EXE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_exact(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=32)
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    write_config(tmp_path / "ref.yaml", tiny_model_dir, data, tmp_path / "ref", **SETTINGS)
    write_config(tmp_path / "cut.yaml", tiny_model_dir, data, tmp_path / "cut", **SETTINGS)

    ref = _run(["train", "ref.yaml", "--force"], env, tmp_path)
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen(
        [EXE, "train", "cut.yaml", "train.seed=42", "--resume", "--force"],  # --resume: nothing there yet
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert f"nothing to resume in {tmp_path / 'cut'} (no checkpoint); starting fresh at step 0" in out
    assert not (tmp_path / "cut" / "run.json").exists(), "training finished before the signal"
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].startswith("step-"), ckpts
    step = int(ckpts[0].split("-")[1])
    assert 3 <= step < 40
    line = err.strip().splitlines()[-1]
    assert f"interrupted (SIGTERM); checkpoint saved at step {step}" in line, line
    command = line.split("resume: ", 1)[1]
    assert command == "tunesmith train cut.yaml train.seed=42 --resume --force"  # the same words

    resumed = _run(shlex.split(command)[1:], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume"
