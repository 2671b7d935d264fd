"""Every bad input: one line on stderr naming file:line or key, exit code 2, nothing written."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_config, write_qa_jsonl
from tunesmith.cli import main


def snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line(code, err, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture()
def setup(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    out = tmp_path / "out"
    return tmp_path, tiny_model_dir, data, out


CASES = {
    "malformed_json_line": (
        "bad.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
        ["bad.jsonl:2", "not valid JSON"],
    ),
    "malformed_csv_line": ("bad.csv", 'instruction,output\n"a","b"\n"c","d","e"\n', ["bad.csv:3"]),
    "missing_field": (
        "miss.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
        ["miss.jsonl:2", "output"],
    ),
    "wrong_type": ("type.jsonl", '{"prompt": "a", "completion": ["x"]}\n', ["type.jsonl:1", "completion"]),
    "empty_dataset": ("empty.jsonl", "\n\n", ["empty.jsonl", "no examples"]),
    "unknown_format": ("odd.jsonl", '{"foo": 1, "bar": 2}\n', ["odd.jsonl:1", "data.format"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_files(capsys, setup, case):
    tmp, model_dir, _, out = setup
    name, text, needles = CASES[case]
    (tmp / name).write_text(text)
    cfg = write_config(tmp / "c.yaml", model_dir, tmp / name, out)
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.learning_rate=1", ["config key train.learning_rate: unknown"]),
        ("adapter.rank=-3", ["config key adapter.rank"]),
        ("data.format=yaml", ["config key data.format: expected one of"]),
        ("adapter.target_modules=[nonexistent_proj]", ["adapter.target_modules", "nonexistent_proj", "q_proj"]),
    ],
)
def test_bad_config_values(capsys, setup, override, needles):
    tmp, model_dir, data, out = setup
    cfg = write_config(tmp / "c.yaml", model_dir, data, out)
    code, err = run_cli(capsys, "train", str(cfg), override)
    assert_one_line(code, err, *needles)
    assert not out.exists()


def test_missing_model(capsys, setup):
    tmp, _, data, out = setup
    cfg = write_config(tmp / "c.yaml", tmp / "no-such-model", data, out)
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "no-such-model", "not found")
    assert not out.exists()


def test_fake_gguf(capsys, setup):
    tmp, _, data, out = setup
    fake = tmp / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    cfg = write_config(tmp / "c.yaml", fake, data, out)
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "model.gguf", "not a GGUF file")
    assert not out.exists()
    code, err = run_cli(capsys, "generate", str(fake), "--prompt", "hi")
    assert_one_line(code, err, "not a GGUF file")


def test_pickled_weights_refused(capsys, setup):
    tmp, _, data, out = setup
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cfg = write_config(tmp / "c.yaml", pickled, data, out)
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "pickled", "safetensors")


def test_output_dir_holding_another_run_is_untouched(capsys, setup):
    tmp, model_dir, data, out = setup
    cfg = write_config(tmp / "c.yaml", model_dir, data, out)
    assert run_cli(capsys, "train", str(cfg))[0] == 0
    before = snapshot(out)
    code, err = run_cli(capsys, "train", str(cfg), "adapter.rank=8")
    assert_one_line(code, err, str(out), "holds another run")
    code, err = run_cli(capsys, "train", str(cfg))  # same run again without --resume
    assert_one_line(code, err, "already holds this run", "resume")
    assert snapshot(out) == before
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "train", str(cfg), f"train.output_dir={foreign}")
    assert_one_line(code, err, "not empty")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bad_flags_and_prompt_files(capsys, setup, tiny_model_dir):
    tmp, *_ = setup
    empty = tmp / "prompts.txt"
    empty.write_text("\n")
    code, err = run_cli(capsys, "generate", str(tiny_model_dir), "--file", str(empty))
    assert_one_line(code, err, "prompts.txt", "no prompts")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_real_console_script_has_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "tunesmith")
    proc = subprocess.run([exe, "train", "adapter.method=qlorax"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "tunesmith: error: config key adapter.method: expected one of full, lora, dora, qlora, got 'qlorax'"
    )


def test_tensorboard_missing_is_one_line_and_writes_nothing(capsys, setup):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here; the missing-package path cannot be shown")
    tmp, model_dir, data, out = setup
    cfg = write_config(tmp / "c.yaml", model_dir, data, out, train={"tensorboard": True})
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "train.tensorboard", "tunesmith[tensorboard]")
    assert not out.exists()


def test_truncated_safetensors_is_one_line(capsys, setup):
    import shutil

    tmp, model_dir, data, out = setup
    broken = tmp / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(capsys, "generate", str(broken), "--prompt", "hi")
    assert_one_line(code, err, "broken", "corrupt or truncated")
    cfg = write_config(tmp / "c.yaml", broken, data, out)
    code, err = run_cli(capsys, "train", str(cfg))
    assert_one_line(code, err, "corrupt or truncated")
    assert not out.exists()
