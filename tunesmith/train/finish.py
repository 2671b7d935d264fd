"""The end of a training run: the trained model and its summary written into the run dir.

Contract: `finish(run, val_loss)` (rank 0 writes; every rank joins the FSDP gather) saves the
model through `save_model` — the adapter (or full model) and tokenizer written into a temp dir and
moved in file by file — plots `loss.png`, writes `run.json`, closes the trackers with the run's
artifacts, prints the closing line and returns the `TrainResult`.
"""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunesmith.io import fsync_dir
from tunesmith.train.distributed import cleanup, full_state_dict


@dataclass
class TrainResult:
    output_dir: Path
    model: object  # the trained torch module (PeftModel for lora/dora), in eval mode
    tokenizer: object
    summary: dict


def finish(run, val_loss: float | None) -> TrainResult:
    """The trained model and its summary, written into the run dir (rank 0)."""
    cfg, dist, model = run.cfg, run.dist, run.model
    wall = run.elapsed()
    summary = {}
    gathered = full_state_dict(model) if dist.enabled and dist.strategy == "fsdp" else None  # collective
    if dist.main:
        out = run.out.path
        save_model(model, run.tokenizer, out, gathered)
        run.records.plot(out / "loss.png")
        summary = {
            "method": cfg.adapter.method,
            "base_model": cfg.model.name,
            "steps": run.step,
            "tokens_seen": run.tokens_seen,
            "train_wall_s": round(wall, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "final_train_loss": run.last_loss,
            "final_val_loss": val_loss,
            "skipped_steps": run.guard.skipped,
            "trainable_params": run.trainable,
            "total_params": run.total_params,
            "train_rows": len(run.train_rows),
            "val_rows": len(run.val_rows),
            "device": str(run.device),
            "world_size": dist.world,
            "precision": run.precision,
            "frozen_dtype": run.frozen_dtype,
            "data": run.stats.__dict__,
        }
        run.out.write_summary(summary)
        run.records.close([out / "loss.png", out / "run.json", out / "tunesmith.yaml"])
        print(
            f"tunesmith: done in {wall:.1f}s, final train loss {run.last_loss or float('nan'):.4f}"
            + (f", validation loss {val_loss:.4f}" if val_loss is not None else "")
            + (f", {run.guard.skipped} divergent updates dropped" if run.guard.skipped else "")
            + f" → {out}",
            flush=True,
        )
    cleanup(dist)
    model.eval()
    return TrainResult(run.out.path, model, run.tokenizer, summary)


def save_model(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Write the adapter (or full model) + tokenizer into a temp dir, then move files in.
    `state_dict`: whole tensors gathered from FSDP shards, saved in place of the model's own."""
    tmp = out / f".final-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out)
