"""A run directory — what `tunesmith train` and `pretrain` write — and the one owner of its layout.

    RUN/tunesmith.yaml                 the resolved config the run was trained with
    RUN/adapter_config.json            an adapter run (lora/dora/qlora): PEFT's files …
    RUN/adapter_model.safetensors
    RUN/config.json, model*.safetensors  … or a full fine-tune: an HF model dir
    RUN/tokenizer*, chat template      beside the model
    RUN/metrics.jsonl, loss.png        one row per logged step; the loss curve
    RUN/run.json                       the summary (steps, tokens, wall time, peak RSS, losses)
    RUN/checkpoints/step-NNNNNNNN/     resumable checkpoints (`train.checkpoint`)
    RUN/replay_targets.safetensors     data.replay_loss: kl — the base model's targets (`train.replay_kl`)
    RUN/export/                        where `export` and `quantize` write by default
    RUN/compare/                       where `compare` writes by default

Contract: `RunDir(path)` reads; it never writes a model. `config()` is the saved config through
`load_config` (a run whose config cannot be read is a one-line `UserError`); `kind` is "adapter",
"full" or None; `finished` says whether the final model is there; `base_model()` is the model an
adapter run was trained from (its saved config, else PEFT's record); `latest_checkpoint()` is the
newest complete, healthy checkpoint (`checkpoints()` also says why newer ones were passed over).
`writing()` is what a writer holds while it trains into the dir: the output lock, and the
leftovers of killed writes removed on entry and exit. Merged and quantized model dirs carry a copy
of `tunesmith.yaml`, so their system prompt is the run's.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from tunesmith.config import Config, config_hash, load_config, save_config
from tunesmith.errors import UserError
from tunesmith.io import LOCK_NAME, OutputLock, manifest_problem, sweep_temp, write_atomic

CONFIG = "tunesmith.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
SUMMARY = "run.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
REPLAY_TARGETS = "replay_targets.safetensors"
RUN_TEMP = ("final", CONFIG, SUMMARY, METRICS, LOSS_PLOT, "pretrain.json", REPLAY_TARGETS)  # temp names of run writes
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json")
# Keys that may change between a run and its resume without making it another run.
RESUMABLE_CHANGES = (
    "train.resume",
    "train.progress",
    "train.tensorboard",
    "train.report_to",
    "train.save_every_minutes",
    "train.log_every",
    "train.keep_last",
    "train.save_every",
    "train.eval_every",
    "train.max_steps",
    "train.epochs",
    "train.device",
    "train.threads",
    "data.cache_dir",
    "compare",
    "pipeline",
    # a different split of the same global batch (checked on resume): processes, strategy
    "train.batch_size",
    "train.grad_accum",
    "train.strategy",
    "train.dist_timeout_s",
    "train.forward_tokens",
    # the same rows and targets, laid out without padding: equal up to fp32 rounding
    "train.padding_free",
    "adapter.fused",
    "train.fused_mlp",
    "train.fused_norm",
    "train.fused_groups",
    "train.fused_rope",
    "train.on_divergence",
    "train.max_skipped_steps",
)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.passed_over: list[tuple[Path, str]] = []

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def compare_dir(self) -> Path:
        return self.path / "compare"

    @property
    def has_config(self) -> bool:
        return self.config_path.is_file()

    @property
    def is_run(self) -> bool:
        """A dir tunesmith trained into (finished or not), or PEFT adapter files from anywhere."""
        return self.path.is_dir() and (self.has_config or (self.path / ADAPTER_CONFIG).is_file())

    @property
    def kind(self) -> str | None:
        if not self.path.is_dir():
            return None
        if (self.path / ADAPTER_CONFIG).is_file():
            return "adapter"
        if (self.path / MODEL_CONFIG).is_file() and any(self.path.glob("*.safetensors")):
            return "full"
        return None

    @property
    def finished(self) -> bool:
        kind = self.kind
        if kind == "adapter":
            return (self.path / ADAPTER_WEIGHTS).is_file()
        return kind == "full"

    @cached_property
    def _config(self) -> Config | None:
        if not self.has_config:
            return None
        try:
            return load_config(self.config_path)
        except UserError as err:
            raise UserError(f"{self.config_path}: this run's saved config cannot be read ({err})") from None

    def config(self) -> Config | None:
        """The saved config, or None when the dir has none (a plain model dir)."""
        return self._config

    @property
    def system_prompt(self) -> str | None:
        cfg = self.config()
        return cfg.data.system_prompt if cfg else None

    def base_model(self) -> str:
        """The base model an adapter run was trained from: its saved config, else PEFT's record."""
        cfg = self.config()
        if cfg is not None and cfg.model.name:
            return cfg.model.name
        adapter = self.path / ADAPTER_CONFIG
        try:
            name = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            name = None
        if not name:
            raise UserError(f"{adapter}: no base_model_name_or_path; cannot find the base model")
        return name

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.summary_path, json.dumps(summary, indent=2))

    def summary(self) -> dict | None:
        """`run.json`, or None before the run has finished."""
        if not self.summary_path.is_file():
            return None
        try:
            return json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON
            raise UserError(f"{self.summary_path}: this run's summary is not readable JSON") from None

    def save_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path)

    def resume_point(self, cfg: Config, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> Path | None:
        """Before training into this dir: refuse one that holds another run (its saved config
        differs outside `ignore`) or anything else; return the checkpoint to resume from, if any.
        An explicit `train.resume=CHECKPOINT` passes the same checks (an empty or new dir, or
        this same run) and must be complete."""
        resume, out = cfg.train.resume, self.path
        explicit = None
        if resume not in ("never", "auto"):
            explicit = Path(resume).expanduser()
            if not (explicit / "state.json").is_file():
                raise UserError(f"config key train.resume: {resume} is not a checkpoint dir (no state.json)")
            problem = manifest_problem(explicit, CHECKPOINT_FILES)
            if problem:
                raise UserError(f"config key train.resume: {resume} is not a complete checkpoint ({problem})")
        if not out.exists():
            return explicit
        if not out.is_dir():
            raise UserError(f"config key train.output_dir: {out} exists and is not a directory")
        if not self.has_config:
            if any(p.name != LOCK_NAME for p in out.iterdir()):
                raise UserError(
                    f"config key train.output_dir: {out} is not empty and holds no tunesmith run; choose another dir"
                )
            return explicit
        try:
            previous = load_config(self.config_path)
        except UserError:
            raise UserError(
                f"{self.config_path}: this output dir holds a run whose config cannot be read; choose another dir"
            ) from None
        if config_hash(previous, ignore) != config_hash(cfg, ignore):
            raise UserError(
                f"config key train.output_dir: {out} holds another run (different config); choose another dir"
            )
        if explicit is not None:
            return explicit
        if resume == "never":
            raise UserError(
                f"config key train.output_dir: {out} already holds this run; pass train.resume=auto "
                "(or --resume) to continue it, or choose another dir"
            )
        return self.latest_checkpoint()

    @contextmanager
    def writing(self):
        """Hold the output lock; leftovers of killed writes go on entry and exit (a dir tunesmith
        trained into only: a foreign one is refused before anything in it is touched)."""
        with OutputLock(self.path, key="train.output_dir") as lock:
            try:
                if lock.active:
                    self.clean_temp()
                yield
            finally:
                if lock.active:
                    self.clean_temp()

    def clean_temp(self) -> None:
        """The run's own leftovers only: another writer (`quantize --out RUN/q`) may share the dir."""
        if self.has_config:
            sweep_temp(self.path, RUN_TEMP)
            sweep_temp(self.checkpoints)

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete, healthy checkpoint; `passed_over` lists the newer ones and why."""
        found, self.passed_over = checkpoints(self.checkpoints)
        return found


def checkpoints(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete, healthy `step-N` dir under `root` (temp dirs ignored), and the newer
    ones passed over with the reason: a file missing or not as its manifest records, or saved
    while the run was diverging (`state.json` "healthy": false)."""
    skipped: list[tuple[Path, str]] = []
    if not root.is_dir():
        return None, skipped
    for path in sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True):
        problem = manifest_problem(path, CHECKPOINT_FILES)
        if problem is None and not checkpoint_healthy(path):
            problem = "saved while the run was diverging"
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def checkpoint_healthy(path: Path) -> bool:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8")).get("healthy", True) is not False
    except (OSError, ValueError, AttributeError):
        return False


def latest_checkpoint(root: Path) -> Path | None:
    return checkpoints(root)[0]
