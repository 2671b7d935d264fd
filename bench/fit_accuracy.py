"""How close is `tunesmith fit` to what training really uses? Predicted vs measured peak RSS and
seconds per step for full, lora (and qlora when this tunesmith has it) on SmolLM2-135M.

Each prediction and each measurement runs in a fresh process: `tunesmith fit --json` for the
prediction, `tunesmith train --force` for a few steps for the measurement (peak RSS from
run.json, s/step = median of tokens / tok_per_s over the steps after the first).

    .venv/bin/python bench/fit_accuracy.py [--steps 4] [--batch-size 2] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def tunesmith(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], cwd=ROOT, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    from tunesmith.config import METHODS

    methods = args.methods or [m for m in ("full", "lora", "qlora") if m in METHODS]
    rows = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            common = [
                str(CONFIG),
                f"adapter.method={method}",
                f"train.batch_size={args.batch_size}",
                f"data.max_length={args.max_length}",
                f"train.max_steps={args.steps}",
                "train.progress=false",
                "train.save_every=0",
                f"train.output_dir={tmp}/{method}",
            ]
            pred_path = Path(tmp) / f"{method}-fit.json"
            fit = tunesmith("fit", *common, "--json", str(pred_path))
            if fit.returncode not in (0, 1):
                print(fit.stderr, file=sys.stderr)
                return 1
            pred = json.loads(pred_path.read_text())
            train = tunesmith("train", *common, "--force")
            if train.returncode != 0:
                print(train.stderr[-2000:], file=sys.stderr)
                return 1
            run = json.loads((Path(tmp) / method / "run.json").read_text())
            metrics = [json.loads(line) for line in (Path(tmp) / method / "metrics.jsonl").read_text().splitlines()]
            steps = [m["tokens"] / m["tok_per_s"] for m in metrics if "tok_per_s" in m and m["step"] > 1]
            measured_s = statistics.median(steps)
            measured_gib = run["peak_rss_mib"] / 1024
            rows.append(
                {
                    "method": method,
                    "pred_peak_gib": round(pred["peak_bytes"] / 2**30, 3),
                    "peak_gib": round(measured_gib, 3),
                    "peak_err": round(pred["peak_bytes"] / 2**30 / measured_gib - 1, 3),
                    "pred_step_s": round(pred["step_s"], 3),
                    "step_s": round(measured_s, 3),
                    "step_err": round(pred["step_s"] / measured_s - 1, 3),
                    "steps_timed": len(steps),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nSmolLM2-135M, batch {args.batch_size} × {args.max_length} tokens (packed), {args.steps} steps; "
        f"load average at start {load[0]:.2f} on {os.cpu_count()} CPUs, at end {os.getloadavg()[0]:.2f}"
    )
    print("| method | predicted peak RSS | measured | error | predicted s/step | measured | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['pred_peak_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | {r['peak_err']:+.0%} "
            f"| {r['pred_step_s']:.2f} | {r['step_s']:.2f} | {r['step_err']:+.0%} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
