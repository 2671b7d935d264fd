"""What a run leaves behind for people: metrics JSONL, the trackers' copies, a loss PNG.

Contract: `Records(out_dir, trackers, resume_step)` appends one JSON object per logged
step to `metrics.jsonl` (on resume, rows after the checkpoint's step are dropped first so
the file reads like one uninterrupted run), hands every row to the trackers
(`train.tracking`: TensorBoard, MLflow, W&B), and `plot()` draws `loss.png` from the JSONL.
`close(files)` closes the file and the trackers, uploading `files` as artifacts (none when a
run is interrupted). Only rank 0 creates one.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.io import write_atomic

METRICS = "metrics.jsonl"


class Records:
    def __init__(self, out_dir: Path, trackers: list, resume_step: int):
        self.path = out_dir / METRICS
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.trackers = trackers

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
        for tracker in self.trackers:
            tracker.log(row)

    def close(self, files=None) -> None:
        """`files`: artifacts for the trackers (a finished run); None closes them without."""
        self.file.close()
        for tracker in self.trackers:
            tracker.finish(files) if files is not None else tracker.close()
        self.trackers = []

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
