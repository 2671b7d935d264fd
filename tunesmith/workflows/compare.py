"""Compare, training first when needed: what `tunesmith compare` and `tunesmith.compare(cfg)` run.

Contract: `compare_with_training(cfg)` returns `eval.compare.run_compare(cfg)`'s results. When an
arm needs the fine-tuned model and `compare.run` names no run, the run this config describes is
trained into `train.output_dir` first — or resumed there when it was interrupted, or reused as it
is when it already finished (`RunDir.finished`).
"""

from __future__ import annotations

import copy

from tunesmith.config import Config
from tunesmith.eval.compare import needs_run, run_compare
from tunesmith.rundir import RunDir


def compare_with_training(cfg: Config) -> dict:
    trained = needs_run(cfg) and not RunDir(cfg.train.output_dir).finished
    if trained:
        from tunesmith.train.loop import run_training

        print(f"tunesmith compare: training {cfg.train.output_dir} first ({cfg.adapter.method})", flush=True)
        staged = copy.deepcopy(cfg)
        if staged.train.resume == "never":
            staged.train.resume = "auto"
        run_training(staged)
    return run_compare(cfg, just_trained=trained)
