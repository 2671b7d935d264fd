"""tunesmith's own LoRA variants against its plain LoRA, paired per round (issue 19's targets).

    .venv/bin/python bench/fast_path_ratios.py [--rounds 3] [--steps 12] [--packing] [--only "lora dropout 0.05"]

The targets are ratios to tunesmith's LoRA at dropout 0, not to TRL: dropout 0.05 ≥ 0.9× its
tokens/s at ≤ 1.1× its peak RSS, DoRA ≥ 0.8×, QLoRA ≥ 0.75×. Every run is a fresh
`throughput_worker.py` process on `throughput_data`'s 400 chat samples (batch 4, max length 512,
r=16 on all linear layers, tunesmith's defaults: `auto` precision), the four settings in
alternating order from round to round; each round's ratios are against that round's LoRA run, so
drift of a shared host cancels. Prints per setting the median tokens/s and peak RSS and the median
paired ratios; writes everything to --json. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SETTINGS = [  # name, method, worker flags
    ("lora", "lora", []),
    ("lora dropout 0.05", "lora", ["--dropout", "0.05"]),
    ("dora", "dora", []),
    ("qlora", "qlora", []),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--packing", action="store_true", help="tunesmith's default packing (else data.packing=false)")
    ap.add_argument("--only", default="", help="comma-separated settings to run (lora is always run)")
    ap.add_argument("--json", default=str(ROOT / "out" / "bench" / "fast_path_ratios.json"))
    args = ap.parse_args()

    from throughput_data import build
    from train_throughput import run_one

    from tunesmith.models import load_tokenizer, resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    data_dir = Path(args.json).parent / "train_throughput_data"
    build(data_dir, load_tokenizer(model_dir))
    extra = ["--packing"] if args.packing else []
    chosen = {"lora", *filter(None, args.only.split(","))} if args.only else {name for name, _, _ in SETTINGS}
    settings = [s for s in SETTINGS if s[0] in chosen]
    runs = []
    for rnd in range(args.rounds):
        for name, method, flags in settings if rnd % 2 == 0 else settings[::-1]:
            spec = {"name": name, "tool": "tunesmith", "method": method, "flags": flags + extra}
            runs.append({**run_one(spec, args, data_dir, model_dir), "round": rnd})
    table = {}
    for name, _, _ in settings:
        mine = [r for r in runs if r["name"] == name]
        paired = []
        for r in mine:
            anchor = next(a for a in runs if a["name"] == "lora" and a["round"] == r["round"])
            paired.append((r["tok_s"] / anchor["tok_s"], r["peak_rss_mib"] / anchor["peak_rss_mib"]))
        table[name] = {
            "tok_s": statistics.median(r["tok_s"] for r in mine),
            "peak_rss_gib": statistics.median(r["peak_rss_mib"] for r in mine) / 1024,
            "val_loss": statistics.median(r["val_loss"] for r in mine),
            "speed_vs_lora_by_round": [round(s, 3) for s, _ in paired],
            "speed_vs_lora": statistics.median(s for s, _ in paired),
            "rss_vs_lora": statistics.median(m for _, m in paired),
        }
    print(
        f"{'setting':<20} {'tok/s':>7} {'peak RSS':>9} {'val loss':>9} {'×LoRA speed':>12} {'×LoRA RSS':>10}  by round"
    )
    for name, row in table.items():
        print(
            f"{name:<20} {row['tok_s']:7.1f} {row['peak_rss_gib']:7.2f} G {row['val_loss']:9.4f} "
            f"{row['speed_vs_lora']:11.2f}× {row['rss_vs_lora']:9.2f}×  {row['speed_vs_lora_by_round']}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": table, "runs": runs}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
