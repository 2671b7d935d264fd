"""`train.report_to` with the real MLflow (local file store) and W&B (WANDB_MODE=offline): the resolved
config as params, every metrics row, loss.png/run.json as artifacts; compare's scores into the same runs;
a tracker that is not installed is one line and exit 2 before anything is written."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.tiny import write_config, write_qa_jsonl

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _wandb_records(path):
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = open(path, "rb").read(), 7, b"", 32768  # 7: the ':W&B' file header
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += room - 7
            continue
        buf, pos = buf + data[pos : pos + n], pos + n
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _tracked_run(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith import finetune, load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        data={"val_fraction": 0.25},
        train={"max_steps": 5, "report_to": ["mlflow", "wandb"], "lr": 3e-3},
    )
    finetune(load_config(cfg))
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def test_mlflow_and_wandb_offline_hold_params_metrics_and_artifacts(tmp_path, tiny_model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, rows = _tracked_run(tmp_path, tiny_model_dir, monkeypatch)
    ids = json.loads((out / "tracking.json").read_text())
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5]

    client = MlflowClient(ids["mlflow"]["uri"])
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.data.params["train.lr"] == "0.003" and run.data.params["train.max_steps"] == "5"
    assert run.data.params["train.report_to"] == '["mlflow", "wandb"]'
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in train_rows]
    val = [r for r in rows if "val_loss" in r]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")] == [r["val_loss"] for r in val]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"loss.png", "run.json", "tunesmith.yaml"}

    (wandb_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / f"run-{ids['wandb']['id']}.wandb"))
    config, history = {}, []
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            item = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            if "loss" in item:
                history.append((item["_step"], item["loss"]))
    assert config["train.lr"] == "0.003" and config["data.max_length"] == "64"
    assert history == [(r["step"], r["loss"]) for r in train_rows]
    files = os.listdir(os.path.join(os.path.dirname(wandb_file), "files"))
    assert {"loss.png", "run.json", "tunesmith.yaml"} <= set(files)
    _compare_scores_go_to_the_same_run(out)


def _compare_scores_go_to_the_same_run(out):
    """`compare.report_to`: the score table lands in the training run's MLflow run, not a new one."""
    from mlflow.tracking import MlflowClient

    from tunesmith import load_config
    from tunesmith.workflows.compare import _report

    (out / "compare").mkdir()
    (out / "compare" / "results.json").write_text("{}")
    results = {
        "model": {"run": str(out)},
        "scores": [
            {"arm": "base", "split": "seen", "metric": "contains", "mean": 0.25},
            {"arm": "finetuned", "split": "seen", "metric": "contains", "mean": 0.75},
        ],
    }
    cfg = load_config(None, [f"train.output_dir={out}", "compare.report_to=[mlflow]"])
    _report(cfg, results)
    ids = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(ids["mlflow"]["uri"])
    run = client.get_run(ids["mlflow"]["run_id"])  # the training run itself, not a new one
    assert run.data.metrics["compare/seen/finetuned/contains"] == 0.75
    assert run.data.metrics["compare/seen/base/contains"] == 0.25
    assert "loss" in run.data.metrics
    assert "results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_tracker_not_installed_is_one_line_before_training(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=8)
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run")
    exe = os.path.join(os.path.dirname(sys.executable), "tunesmith")
    proc = subprocess.run(
        [exe, "train", str(cfg), "train.report_to=[mlflow,tensorboard]", "--force"],
        capture_output=True,
        text=True,
        env={**os.environ, "TUNESMITH_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "tunesmith: error: config key train.report_to: tensorboard is not installed; "
        "pip install 'tunesmith[tensorboard]' (or leave tensorboard out)"
    )
    assert not (tmp_path / "run").exists()
