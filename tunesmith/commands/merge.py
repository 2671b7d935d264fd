"""`tunesmith merge RUN_DIR [--out DIR] [--force]` → `tunesmith.export.merge.merge_run`."""

from __future__ import annotations

HELP = "fold a run's LoRA/DoRA adapter into its base; write an HF model dir"
FLAGS = {"out_dir": "--out", "force=True": "--force"}


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="run dir with a LoRA/DoRA adapter")
    p.add_argument("--out", help="output dir (default: RUN_DIR-merged)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output dir")


def run(args) -> int:
    from tunesmith.export.merge import dir_size, merge_run

    out = merge_run(args.run_dir, args.out, force=args.force)
    print(f"tunesmith: merged {args.run_dir} → {out} ({dir_size(out) / 2**20:.1f} MiB)")
    return 0
