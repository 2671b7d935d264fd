"""Output safety through the real CLI: two writers into one dir (one refused, one finishes), resume
falling back past a corrupt checkpoint, killed writes' leftovers removed, `quantize --out RUN`
refused, `pipeline --from` checking first and never deleting a folder it did not write."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.cli import main

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")


def env_for(tmp_path):
    return {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_second_writer_is_refused_with_one_line_and_the_first_finishes(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, train={"max_steps": 500, "log_every": 50})
    env = env_for(tmp_path)
    first = subprocess.Popen(
        [EXE, "train", str(cfg), "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = out / ".tunesmith.lock"
    deadline = time.time() + 300
    while not (lock.is_file() and lock.read_text().strip()):
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    second = subprocess.run(
        [EXE, "train", str(cfg), "train.resume=auto", "--force"], env=env, capture_output=True, text=True, timeout=300
    )
    still_running = first.poll() is None
    out_first, err_first = first.communicate(timeout=600)
    assert still_running, "the first run finished before the second started; the test proved nothing"
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "being written by another" in lines[0], lines
    assert first.returncode == 0, err_first
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(50, 501, 50))  # one writer's log, not two interleaved
    assert not lock.exists()  # released on exit


def test_resume_falls_back_past_a_corrupt_checkpoint_and_sweeps_killed_writes(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    out = tmp_path / "run"
    settings = {"max_steps": 6, "save_every": 2, "keep_last": 3}
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, out, train=settings)
    env = env_for(tmp_path)
    assert subprocess.run([EXE, "train", str(cfg), "--force"], env=env, capture_output=True).returncode == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    # the newest checkpoint: one flipped byte, same size; the one before: a file deleted
    opt = ck / "step-00000006" / "optimizer.pt"
    raw = bytearray(opt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    opt.write_bytes(bytes(raw))
    (ck / "step-00000004" / "rng.safetensors").unlink()
    # what killed writes leave behind
    (ck / ".step-00000008.tmp-99999").mkdir()
    (ck / ".step-00000008.tmp-99999" / "trainable.safetensors").write_bytes(b"x" * 100)
    (out / ".final-tmp-99999").mkdir()

    proc = subprocess.run(
        [EXE, "train", str(cfg), "train.max_steps=8", "--force", "--resume"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipping " + str(ck / "step-00000006") + " (optimizer.pt does not match its SHA-256" in proc.stdout
    assert "skipping " + str(ck / "step-00000004") + " (rng.safetensors is missing)" in proc.stdout
    assert "resuming at step 2" in proc.stdout
    assert not (ck / ".step-00000008.tmp-99999").exists() and not (out / ".final-tmp-99999").exists()
    assert json.loads((out / "run.json").read_text())["steps"] == 8
    # the corrupt step-6 was trained again and saved whole, in place of the broken one
    from tunesmith.io import manifest_problem

    assert manifest_problem(ck / "step-00000006") is None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from tunesmith import finetune
    from tunesmith.config import load_config

    tmp = tmp_path_factory.mktemp("finished")
    data = write_qa_jsonl(tmp / "qa.jsonl", n=8)
    cfg = write_config(tmp / "c.yaml", tiny_model_dir, data, tmp / "run", train={"max_steps": 2})
    os.environ.setdefault("TUNESMITH_HOME", str(tmp / "home"))
    finetune(load_config(cfg))
    return tmp / "run"


@pytest.mark.parametrize("verb", ["quantize", "merge"])
@pytest.mark.parametrize("where", ["itself", "parent"])
def test_out_may_not_be_or_hold_the_input(finished_run, verb, where, capsys):
    before = tree_hash(finished_run.parent)
    out = finished_run if where == "itself" else finished_run.parent
    extra = ["--method", "int8"] if verb == "quantize" else []
    code = main([verb, str(finished_run), *extra, "--out", str(out), "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("tunesmith: error: --out: ") and ("input" in err), err
    assert tree_hash(finished_run.parent) == before


def _pipeline_cfg(tmp_path, tiny_model_dir, root, data) -> Path:
    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": [str(data)], "max_length": 64},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 2, "progress": False},
        "pipeline": {"output_dir": str(root), "stages": ["finetune", "merge", "export"], "verify": False},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_from_checks_first_and_never_deletes_a_users_folder(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "pipe"
    for name in ("export", "merged"):  # the user's own folders, under the pipeline's root
        (root / name).mkdir(parents=True)
        (root / name / "mine.txt").write_text("keep me")
    before = tree_hash(root)
    # --from finetune with a missing data file: refused before anything is cleared
    cfg = _pipeline_cfg(tmp_path, tiny_model_dir, root, tmp_path / "missing.jsonl")
    code = main(["pipeline", str(cfg), "--from", "finetune"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.jsonl" in err, err
    assert tree_hash(root) == before
    # good data: the stages would write into folders pipeline.json does not record: refused, untouched
    cfg = _pipeline_cfg(tmp_path, tiny_model_dir, root, write_qa_jsonl(tmp_path / "qa.jsonl", n=8))
    code = main(["pipeline", str(cfg), "--from", "finetune"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "was not written by this pipeline" in err and str(root / "merged") in err
    assert tree_hash(root) == before


def test_data_check_json_may_not_overwrite_the_data(tmp_path, capsys):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=4)
    before = data.read_bytes()
    code = main(["data", "check", str(data), "--json", str(data)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tunesmith: error: --json: ") and "is the input" in err, err
    assert data.read_bytes() == before
