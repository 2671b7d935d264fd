"""What a run leaves behind for people: metrics JSONL, optional TensorBoard, a loss PNG.

Contract: `Records(out_dir, tensorboard, resume_step)` appends one JSON object per logged
step to `metrics.jsonl` (on resume, rows after the checkpoint's step are dropped first so
the file reads like one uninterrupted run), mirrors scalars to TensorBoard when asked, and
`plot()` draws `loss.png` from the JSONL. Only rank 0 creates one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.io import write_atomic

METRICS = "metrics.jsonl"


def require_tensorboard() -> None:
    """Called before a run writes anything, so a missing package fails cleanly."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "config key train.tensorboard: the tensorboard package is not installed; "
            "pip install 'tunesmith[tensorboard]'"
        )


class Records:
    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int):
        self.path = out_dir / METRICS
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        write_atomic(self.path, "".join(k + "\n" for k in keep))

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
