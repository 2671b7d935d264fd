"""Data sources beyond single files: save_to_disk folders, shard folders, hub names, splits, column
mapping, and the data cache key following the sources' contents."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.config import DataConfig, load_config
from tunesmith.data.formats import load_examples
from tunesmith.data.sft import _cache_key
from tunesmith.data.sources import open_source, open_sources
from tunesmith.errors import UserError


def qa(n, start=0, q="question", a="answer"):
    return [{q: f"What is {i}?", a: f"It is {i}."} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Dataset folder (2 shards) and a DatasetDict folder (train, test) written by `datasets`."""
    import datasets

    root = tmp_path_factory.mktemp("saved")
    ds = datasets.Dataset.from_list(qa(6))
    ds.save_to_disk(str(root / "one"), num_shards=2)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(qa(4)), "test": datasets.Dataset.from_list(qa(2, start=10))}
    )
    dd.save_to_disk(str(root / "dd"))
    return root


COLUMNS = {"instruction": "question", "output": "answer"}


def test_save_to_disk_dataset_and_dataset_dict(saved):
    one = load_examples([str(saved / "one")], columns=COLUMNS)
    assert [ex.messages[0]["content"] for ex in one] == [f"What is {i}?" for i in range(6)]
    assert [ex.where for ex in one][-1] == f"{saved / 'one'}:row 6"  # rows numbered across both shards
    test = load_examples([str(saved / "dd")], split="test", columns=COLUMNS)
    assert [ex.messages[1]["content"] for ex in test] == ["It is 10.", "It is 11."]
    assert test[0].where == f"{saved / 'dd'}[test]:row 1"


def test_folder_without_the_split_is_one_line(saved):
    with pytest.raises(UserError, match=r"dd: no split 'validation' in this dataset folder \(it has train, test\)"):
        open_source(str(saved / "dd"), "validation")


def test_missing_mapped_column_names_row_and_column(saved):
    with pytest.raises(UserError) as err:
        load_examples([str(saved / "one")], columns={"instruction": "prompt_text", "output": "answer"})
    assert str(err.value) == (
        f'{saved / "one"}:row 1: no column "prompt_text" (data.columns maps instruction to it); '
        "the record has question, answer"
    )


def test_mapped_field_errors_name_the_record_key(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"q": "a", "a": 3}) + "\n")
    with pytest.raises(UserError, match=r'x.jsonl:1: field "a" \(data.columns.output\) must be a string, got number'):
        load_examples([str(path)], columns={"instruction": "q", "output": "a"})
    with pytest.raises(UserError, match="config key data.columns: unknown field 'answer'"):
        load_examples([str(path)], columns={"answer": "a"})


def write_shards(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        rows = qa(3, start=10 * k, q="instruction", a="output")
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        elif name.endswith(".arrow"):
            with pa.ipc.new_file(str(path), pa.Table.from_pylist(rows).schema) as w:
                w.write_table(pa.Table.from_pylist(rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shard_folder_reads_every_type_in_name_order(tmp_path):
    write_shards(tmp_path / "s", ["part-0.parquet", "part-1.jsonl", "sub/part-2.arrow", ".hidden.jsonl"])
    examples = load_examples([str(tmp_path / "s")])
    assert len(examples) == 9
    assert examples[0].where == f"{tmp_path / 's' / 'part-0.parquet'}:row 1"
    assert examples[3].where == f"{tmp_path / 's' / 'part-1.jsonl'}:1"
    assert examples[6].where.endswith("part-2.arrow:row 1")


def test_shard_folder_splits_follow_the_hub_naming(tmp_path):
    write_shards(tmp_path / "s", ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"])
    write_shards(tmp_path / "s" / "valid", ["0.jsonl"])
    assert len(load_examples([str(tmp_path / "s")])) == 6
    assert len(load_examples([str(tmp_path / "s")], split="validation")) == 3
    with pytest.raises(UserError, match=r"no split 'test' among these shards \(file names give train, validation\)"):
        load_examples([str(tmp_path / "s")], split="test")
    write_shards(tmp_path / "s", ["notes.jsonl"])
    with pytest.raises(UserError, match=r"notes.jsonl: its name gives no split while other files in .* \(train, valid"):
        load_examples([str(tmp_path / "s")])


def test_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no data files in this folder"):
        load_examples([str(tmp_path / "empty")])


def test_validation_split_of_the_train_source(saved):
    cfg = DataConfig(train=[str(saved / "dd")], validation_split="test")
    train, val = open_sources(cfg)
    assert [src.name for src in val] == [f"{saved / 'dd'}[test]"]
    cfg = DataConfig(train=[str(saved / "one")], validation_split="test")
    with pytest.raises(UserError, match="holds a single split, so data.validation_split=test"):
        open_sources(cfg)


def test_missing_file_like_name_is_never_a_hub_lookup():
    with pytest.raises(UserError, match="data file not found"):
        load_examples(["missing/train.jsonl"])


def test_columns_config_key_is_a_mapping(tmp_path):
    cfg = load_config(None, ["data.columns={instruction: question, output: answer}", "data.split=test"])
    assert cfg.data.columns == COLUMNS and cfg.data.split == "test"
    assert load_config(None, ["data.columns.output=answer"]).data.columns == {"output": "answer"}
    with pytest.raises(UserError, match="config key data.columns: expected a mapping"):
        load_config(None, ["data.columns=question"])


def test_cache_key_follows_folder_contents(tmp_path, tiny_tokenizer):
    write_shards(tmp_path / "s", ["a.jsonl", "b.parquet"])
    cfg = DataConfig(train=[str(tmp_path / "s")])

    def key():
        return _cache_key(cfg, tiny_tokenizer, 0, *open_sources(cfg))

    first = key()
    assert first == key()
    shard = tmp_path / "s" / "a.jsonl"
    shard.write_text(shard.read_text() + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    assert key() != first
    second = key()
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # same bytes, touched
    assert key() != second
    cfg.columns = {"text": "output"}
    assert key() not in (first, second)


def test_hub_name_goes_to_load_dataset_with_subset_and_split(monkeypatch):
    """The glue only (tests never reach the hub): the name, subset and split go to
    `datasets.load_dataset`, rows are located as name[split]:row N, the fingerprint is the split's."""
    import datasets

    calls = []
    local = datasets.Dataset.from_list(qa(3))

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(train=["owner/qa"], subset="small", split="dev", columns=COLUMNS)
    (src,), _ = open_sources(cfg)
    assert src.fingerprint() == f"owner/qa/small[dev]\0{local._fingerprint}"
    examples = load_examples(cfg.train, split="dev", subset="small", columns=COLUMNS)
    assert [ex.where for ex in examples] == [f"owner/qa/small[dev]:row {n}" for n in (1, 2, 3)]
    assert examples[2].messages[1]["content"] == "It is 2."
    assert set(calls) == {("owner/qa", "small", "dev")}
