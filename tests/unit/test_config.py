"""Config tree: YAML + overrides, unknown keys and bad values are one-line UserErrors."""

from pathlib import Path

import pytest

from tunesmith.config import config_hash, load_config, save_config
from tunesmith.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "adapter:\n  method: dora\n  rank: 4\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(p, ["train.max_steps=60", "adapter.rank=8", "data.packing=false", "data.train=a.jsonl"])
    assert cfg.adapter.method == "dora"
    assert cfg.adapter.rank == 8
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; we coerce
    assert cfg.train.max_steps == 60
    assert cfg.data.packing is False
    assert cfg.data.train == [str(Path.cwd() / "a.jsonl")]  # one string becomes a list; an override's path, absolute


def test_roundtrip_and_hash(tmp_path):
    cfg = load_config(None, ["train.max_steps=5", "data.train=[x.jsonl, y.csv]"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    other = load_config(None, ["train.max_steps=6", "data.train=[x.jsonl, y.csv]"])
    assert config_hash(other) != config_hash(cfg)
    assert config_hash(other, ("train.max_steps",)) == config_hash(cfg, ("train.max_steps",))


def test_data_paths_relative_to_yaml(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = write(tmp_path, "data:\n  train: d.jsonl\n")
    assert load_config(p).data.train == [str(tmp_path / "d.jsonl")]


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("trian:\n  lr: 1\n", [], "config key trian: unknown"),
        ("train:\n  learning_rate: 1\n", [], "config key train.learning_rate: unknown"),
        ("", ["adapter.rank=abc"], "config key adapter.rank: expected an integer"),
        ("", ["adapter.method=qlorax"], "config key adapter.method: expected one of full, lora, dora"),
        ("", ["train.lr=-1"], "config key train.lr: expected a number > 0"),
        ("", ["data.packing=maybe"], "config key data.packing: expected true or false"),
        ("", ["data.val_fraction=1.5"], "config key data.val_fraction"),
        ("", ["train.device=tpu"], "config key train.device"),
        ("", ["nokey"], "override 'nokey': expected key.sub=value"),
        ("train: [1, 2]\n", [], "config key train: expected a section"),
        ("train:\n  lr: [1\n", [], "c.yaml:"),
        ("- a\n- b\n", [], "expected a mapping"),
    ],
)
def test_bad_config(tmp_path, text, overrides, needle):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_config(p, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
