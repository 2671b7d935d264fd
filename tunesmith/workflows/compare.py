"""Compare, training first when needed: what `tunesmith compare` and `tunesmith.compare(cfg)` run.

Contract: `compare_with_training(cfg)` returns `eval.compare.run_compare(cfg)`'s results. When an
arm needs the fine-tuned model and `compare.run` names no run, the run this config describes is
trained into `train.output_dir` first — or resumed there when it was interrupted, or reused as it
is when it already finished (`RunDir.finished`). With `compare.report_to`, the score table (primary
and other metrics per split × arm) and results.json/report.html go to the run's tracker runs too.
"""

from __future__ import annotations

import copy
from pathlib import Path

from tunesmith.config import Config
from tunesmith.eval.compare import needs_run, run_compare
from tunesmith.rundir import RunDir


def compare_with_training(cfg: Config) -> dict:
    if cfg.compare.report_to:
        from tunesmith.train.tracking import require_trackers

        require_trackers(cfg.compare.report_to, "compare.report_to")  # before minutes of work
    trained = needs_run(cfg) and not RunDir(cfg.train.output_dir).finished
    if trained:
        from tunesmith.infer.replay import prepare_replay
        from tunesmith.train.loop import run_training

        print(f"tunesmith compare: training {cfg.train.output_dir} first ({cfg.adapter.method})", flush=True)
        staged = copy.deepcopy(cfg)
        if staged.train.resume == "never":
            staged.train.resume = "auto"
        prepare_replay(staged)  # data.replay_source=self: the base model's answers, once
        run_training(staged)
    results = run_compare(cfg, just_trained=trained)
    if cfg.compare.report_to:
        _report(cfg, results)
    return results


def _report(cfg: Config, results: dict) -> None:
    from tunesmith.train.tracking import log_scores

    run_dir = Path(results["model"]["run"] or cfg.train.output_dir)
    out = Path(cfg.compare.output_dir) if cfg.compare.output_dir else run_dir / "compare"
    metrics = {f"compare/{r['split']}/{r['arm']}/{r['metric']}": r["mean"] for r in results["scores"]}
    log_scores(run_dir, cfg.compare.report_to, metrics, [out / "results.json", out / "report.html"])
    print(f"tunesmith compare: scores logged to {', '.join(cfg.compare.report_to)}", flush=True)
