"""Training throughput of two revisions of tunesmith, side by side: is a change within noise?

    .venv/bin/python bench/revisions.py --before REV [--rounds 3] [--steps 20] [--methods lora full]

Checks REV out into a git worktree (`out/bench/rev-SHA`, reused) and runs `bench/throughput_worker.py`
of each tree — the same data, model, batch and settings as `train_throughput.py`'s tunesmith rows,
each run a fresh process — alternating before/after and their order from round to round, so drift
of a shared host hits both alike. Prints per run tokens/s (median over steps, warm-up excluded),
peak RSS and validation loss; per method the medians over rounds and the after/before ratio of the
medians and per round (runs minutes apart pair up; their median is the paired ratio). Writes
everything to --json. Run it alone: two heavy jobs on 2 cores wreck every timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
LR = {"lora": 2e-4, "full": 2e-5}


def worktree(rev: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    path = ROOT / "out" / "bench" / f"rev-{sha[:10]}"
    if not (path / "tunesmith").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), sha], cwd=ROOT, check=True)
    return path


def run(tree: Path, method: str, args, data_dir: Path, model_dir: str) -> dict:
    cmd = [
        sys.executable, str(tree / "bench" / "throughput_worker.py"), "--tool", "tunesmith", "--method", method,
        "--data", str(data_dir), "--model", model_dir, "--steps", str(args.steps), "--batch", str(args.batch),
        "--lr", str(LR[method]), "--threads", str(args.threads), "--set", *args.set,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree} {method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rates = [n / s for n, s in zip(result["step_tokens"], result["step_s"])][args.warmup :]
    result["tok_s"] = statistics.median(rates)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare the working tree against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--set", nargs="*", default=[], help="tunesmith key=value overrides for both trees")
    ap.add_argument("--json", default=str(ROOT / "out" / "bench" / "revisions.json"))
    args = ap.parse_args()

    from throughput_data import build

    from tunesmith.models import load_tokenizer, resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    data_dir = Path(args.json).parent / "train_throughput_data"
    build(data_dir, load_tokenizer(model_dir))
    trees = {"before": worktree(args.before), "after": ROOT}
    print(f"before: {args.before} ({trees['before']}); after: the working tree; {platform.processor()}", flush=True)
    results = []
    for rnd in range(args.rounds):
        order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
        for method in args.methods:
            for side in order:
                r = run(trees[side], method, args, data_dir, model_dir)
                results.append({"round": rnd, "side": side, "method": method, **r})
                print(
                    f"  round {rnd + 1} {method:<4} {side:<6} {r['tok_s']:7.1f} tok/s  "
                    f"RSS {r['peak_rss_mib'] / 1024:5.2f} GiB  val {r['val_loss']:.4f}",
                    flush=True,
                )
    summary = {}
    for method in args.methods:
        rows = {s: [r for r in results if r["method"] == method and r["side"] == s] for s in trees}
        med = {s: statistics.median(r["tok_s"] for r in rows[s]) for s in trees}
        paired = [a["tok_s"] / b["tok_s"] for a, b in zip(rows["after"], rows["before"])]
        summary[method] = {
            "tok_s": med,
            "tok_s_runs": {s: [round(r["tok_s"], 1) for r in rows[s]] for s in trees},
            "peak_rss_gib": {s: statistics.median(r["peak_rss_mib"] for r in rows[s]) / 1024 for s in trees},
            "val_loss": {s: statistics.median(r["val_loss"] for r in rows[s]) for s in trees},
            "ratio_of_medians": med["after"] / med["before"],
            "ratio_by_round": paired,
            "ratio_paired": statistics.median(paired),
        }
        q = summary[method]
        print(
            f"{method}: before {med['before']:.1f} tok/s, after {med['after']:.1f} tok/s = "
            f"{q['ratio_of_medians']:.3f}× (per round {', '.join(f'{x:.3f}' for x in paired)}; "
            f"median {q['ratio_paired']:.3f}×); peak RSS {q['peak_rss_gib']['before']:.2f} → "
            f"{q['peak_rss_gib']['after']:.2f} GiB; val loss {q['val_loss']['before']:.4f} → "
            f"{q['val_loss']['after']:.4f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "summary": summary, "runs": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
