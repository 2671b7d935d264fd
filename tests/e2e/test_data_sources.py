"""The real `tunesmith train` on data given as a `save_to_disk` folder, a folder of parquet shards,
and tool-call conversations; and each bad input of those kinds as one line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_bad_input import assert_one_line, run_cli
from tests.tiny import NAMES, TOOL_CHATML, write_config
from tests.unit.test_tools import assert_labels_on_assistant_turns, conversation

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")


def rows(n, start=0):
    return [
        {"question": f"What is the answer {i}?", "answer": f"The answer is {NAMES[i % len(NAMES)]}."}
        for i in range(start, start + n)
    ]


def train_cli(tmp_path, cfg, *overrides):
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([EXE, "train", str(cfg), *overrides], capture_output=True, text=True, env=env, timeout=300)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_on_a_save_to_disk_folder(tmp_path, tiny_model_dir):
    """A DatasetDict folder with its own column names: train on one split, validate on another."""
    import datasets

    folder = tmp_path / "qa-dataset"
    splits = {"train": datasets.Dataset.from_list(rows(12)), "test": datasets.Dataset.from_list(rows(4, 100))}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    out = tmp_path / "out"
    columns = {"instruction": "question", "output": "answer"}
    cfg = write_config(
        tmp_path / "c.yaml", tiny_model_dir, folder, out, data={"columns": columns, "validation_split": "test"}
    )
    proc = train_cli(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr
    assert "16 examples" in proc.stdout  # 12 train + 4 test
    got = metrics(out)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 7))
    assert any("val_loss" in r for r in got)
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_trains_on_a_parquet_shard_folder(tmp_path, tiny_model_dir):
    """Hub-style shard names: the train shards are read, the test shard is not."""
    folder = tmp_path / "shards" / "data"
    folder.mkdir(parents=True)
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows(6, 6 * k)), folder / f"train-0000{k}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows(5, 100)), folder / "test-00000-of-00001.parquet")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "shards", out)
    proc = train_cli(tmp_path, cfg, "data.columns={instruction: question, output: answer}")
    assert proc.returncode == 0, proc.stderr
    assert "12 examples" in proc.stdout
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 7))


def test_cli_trains_on_tool_calls_with_labels_on_assistant_tokens(tmp_path, tiny_model_dir):
    """The samples the CLI trained on (its tokenised-data cache) carry labels exactly on the
    assistant's tool call and final answer, token by token."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(conversation()) + "\n" for _ in range(4)))
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_model_dir, data, out, data={"chat_template": TOOL_CHATML, "max_length": 512}
    )
    proc = train_cli(tmp_path, cfg, "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr
    (cache,) = (tmp_path / "home" / "data-cache").glob("sft-*.safetensors")
    tensors = load_file(str(cache))
    offsets = tensors["train.offsets"].tolist()
    assert len(offsets) == 5
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for a, b in zip(offsets, offsets[1:]):
        ids, labels = tensors["train.input_ids"][a:b].tolist(), tensors["train.labels"][a:b].tolist()
        assert_labels_on_assistant_turns(tokenizer, ids, labels)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.fixture()
def bad(tmp_path, tiny_model_dir):
    def config(data, **data_keys):
        return write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out", data=data_keys)

    return tmp_path, config


def test_tool_calls_with_a_tool_less_template(capsys, bad):
    tmp, config = bad
    data = tmp / "tools.jsonl"
    data.write_text(json.dumps(conversation()) + "\n")
    code, err = run_cli(capsys, "train", str(config(data)))
    assert_one_line(code, err, f"{data}:1: the chat template does not render tool calls", "data.chat_template")
    assert not (tmp / "out").exists()


def test_tool_result_without_a_call(capsys, bad):
    tmp, config = bad
    data = tmp / "tools.jsonl"
    data.write_text(json.dumps(conversation(answer_id="other")) + "\n")
    code, err = run_cli(capsys, "train", str(config(data, chat_template=TOOL_CHATML)))
    assert_one_line(code, err, f"{data}:1: message 3 is a tool result", "no matching earlier tool call")
    assert not (tmp / "out").exists()


def test_folder_without_the_split_or_column(capsys, bad):
    tmp, config = bad
    folder = tmp / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows(4)), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows(2)), folder / "validation.parquet")
    code, err = run_cli(capsys, "train", str(config(folder, split="test")))
    assert_one_line(code, err, f"{folder}: no split 'test'", "validation", "data.split")
    columns = {"instruction": "query", "output": "answer"}
    code, err = run_cli(capsys, "train", str(config(folder, columns=columns)))
    assert_one_line(code, err, f'{folder / "train.parquet"}:row 1: no column "query"', "data.columns")
    assert not (tmp / "out").exists()


def test_hub_name_while_offline(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, "tunesmith-tests/no-such-dataset", out)
    proc = train_cli(tmp_path, cfg)  # HF_HUB_OFFLINE=1 (conftest) and an empty HF_HOME
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "tunesmith-tests/no-such-dataset: no such data file or folder" in line and "HF_HUB_OFFLINE=1" in line
    assert not out.exists()


def test_data_check_counts_tool_calls_in_a_shard_folder(capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "shards"
    folder.mkdir()
    plain = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (folder / "part-0.jsonl").write_text(json.dumps(conversation()) + "\n" + json.dumps(plain) + "\n")
    (folder / "part-1.jsonl").write_text(json.dumps(conversation(call_id="c2", answer_id="c2")) + "\n")
    cfg = write_config(
        tmp_path / "c.yaml", tiny_model_dir, folder, tmp_path / "out", data={"chat_template": TOOL_CHATML}
    )
    report = tmp_path / "report.json"
    code, _ = run_cli(capsys, "data", "check", str(folder), "--config", str(cfg), "--json", str(report))
    assert code == 0
    got = json.loads(report.read_text())
    assert got["n_train"] == 3 and got["tool_use"] == {"records": 2, "calls": 2, "results": 2}
    assert got["lengths"]["unit"] == "tokens" and got["counts"]["empty_answer"] == 0
