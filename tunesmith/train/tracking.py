"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases (`train.report_to`).

Contract:
- `require_trackers(names, key)` checks, before a run writes anything, that each named tracker's
  library is installed; a missing one is a `UserError` naming the extra to install.
- `open_trackers(cfg, out_dir, resume_step)` starts one tracker per name in `train.report_to`
  (plus TensorBoard for the old `train.tensorboard: true`) on rank 0. Each gets the resolved config
  as flat params (`train.lr`, …), then `log(row)` for every metrics row and, at the end,
  `finish(files)` uploads the run's artifacts (loss.png, run.json, tunesmith.yaml) and closes.
  `close()` closes without artifacts (an interrupted run).
- MLflow logs to `MLFLOW_TRACKING_URI`; unset, to a local file store `RUN/mlruns` (offline, no
  server; the file store is allowed for that URI). W&B honours `WANDB_MODE=offline` (files under
  `RUN/wandb`), `WANDB_PROJECT` (default "tunesmith").
- The ids of the tracker runs are kept in `RUN/tracking.json`, so a resumed run and `tunesmith
  compare` (`compare.report_to`, `log_scores`) log into the same tracker runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.io import write_atomic

IDS = "tracking.json"
EXTRA = {"tensorboard": "tensorboard", "mlflow": "tracking", "wandb": "tracking"}
MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def wanted(train_cfg) -> list[str]:
    """`train.report_to`, with the old `train.tensorboard: true` meaning tensorboard too."""
    names = list(dict.fromkeys(train_cfg.report_to))
    if train_cfg.tensorboard and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names


def require_trackers(names, key: str = "train.report_to") -> None:
    for name in names:
        if importlib.util.find_spec(MODULE[name]) is None:
            raise UserError(
                f"config key {key}: {name} is not installed; pip install 'tunesmith[{EXTRA[name]}]' "
                f"(or leave {name} out)"
            )


def flat_params(cfg) -> dict[str, str]:
    """The resolved config as `section.key → value` strings (lists as JSON)."""
    out = {}
    for section, values in dataclasses.asdict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def _read_ids(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / IDS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_id(out_dir: Path, name: str, value: dict) -> None:
    ids = _read_ids(out_dir)
    ids[name] = value
    write_atomic(out_dir / IDS, json.dumps(ids, indent=1) + "\n")


class TensorBoard:
    def __init__(self, cfg, out_dir: Path, resume_step: int, params: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def finish(self, files) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()


def mlflow_uri(out_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (out_dir.resolve() / "mlruns").as_uri()


def _allow_file_store(uri: str) -> None:
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store in maintenance mode behind this switch; a local,
        # server-less store is exactly what an offline run asks for
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class MLflow:
    def __init__(self, cfg, out_dir: Path, resume_step: int, params: bool = True):
        import mlflow

        self.mlflow = mlflow
        known = _read_ids(out_dir).get("mlflow", {})
        uri = known.get("uri") or mlflow_uri(out_dir)
        _allow_file_store(uri)
        mlflow.set_tracking_uri(uri)
        if known.get("run_id"):
            self.run = mlflow.start_run(run_id=known["run_id"])
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunesmith"
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=out_dir.resolve().name)
            _save_id(out_dir, "mlflow", {"uri": uri, "run_id": self.run.info.run_id})
        if params and not known.get("run_id"):
            items = list(flat_params(cfg).items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i : i + 100]))

    def log(self, row: dict) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self.mlflow.log_metrics(values, step=int(row.get("step", 0)))

    def finish(self, files) -> None:
        for path in files:
            if Path(path).is_file():
                self.mlflow.log_artifact(str(path))
        self.close()

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    def __init__(self, cfg, out_dir: Path, resume_step: int, params: bool = True):
        import wandb

        self.wandb = wandb
        known = _read_ids(out_dir).get("wandb", {})
        again = {"id": known["id"], "resume": "allow"} if known.get("id") else {}
        self.run = wandb.init(
            project=known.get("project") or os.environ.get("WANDB_PROJECT") or "tunesmith",
            dir=str(out_dir.resolve()),
            name=out_dir.resolve().name,
            config=flat_params(cfg) if params else None,
            settings=wandb.Settings(console="off", save_code=False, silent=True),
            **again,
        )
        self.out_dir = out_dir.resolve()
        if not known.get("id"):
            _save_id(out_dir, "wandb", {"id": self.run.id, "project": self.run.project})

    def log(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(row.get("step", 0)))

    def finish(self, files) -> None:
        for path in files:
            if Path(path).is_file():
                self.run.save(str(Path(path).resolve()), base_path=str(Path(path).resolve().parent), policy="now")
        self.close()

    def close(self) -> None:
        self.run.finish()


TRACKER = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def check_trackers(train_cfg) -> None:
    """Before anything is written: every tracker the config names is installed."""
    require_trackers([n for n in wanted(train_cfg) if n in train_cfg.report_to])
    if train_cfg.tensorboard and "tensorboard" not in train_cfg.report_to:
        require_trackers(["tensorboard"], "train.tensorboard")


def _start(name: str, *args, **kwargs):
    try:
        return TRACKER[name](*args, **kwargs)
    except (ImportError, UserError):
        raise
    except Exception as err:  # e.g. W&B online without a login, an unreachable MLflow server
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"{name} could not start a run ({first}); for offline use set "
            + ("MLFLOW_TRACKING_URI=file:DIR" if name == "mlflow" else "WANDB_MODE=offline")
        ) from None


def open_trackers(cfg, out_dir: Path, resume_step: int) -> list:
    check_trackers(cfg.train)
    return [_start(name, cfg, out_dir, resume_step) for name in wanted(cfg.train)]


def log_scores(run_dir: Path, names, metrics: dict[str, float], files) -> None:
    """`tunesmith compare`: the score table as metrics (and its files) in the run's tracker runs."""
    require_trackers(names, "compare.report_to")
    for name in names:
        tracker = _start(name, None, Path(run_dir), 0, params=False)
        tracker.log(metrics)
        tracker.finish(files)
