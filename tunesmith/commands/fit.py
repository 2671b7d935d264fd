"""`tunesmith fit [CONFIG] [key=value ...] [--ram-gib N] [--no-probe] [--json PATH]` → `tunesmith.estimate`.

Prints the predicted peak RAM (by part), seconds per step, total steps and time, disk need, and whether the run
fits; exit 0 when it does, 1 when it does not (with the overrides that would make it fit).
"""

from __future__ import annotations

import json

from tunesmith.commands import add_config_arguments, load_config_args

HELP = "predict peak RAM, s/step and disk of a training run; say what makes it fit"
FLAGS = {"ram_gib": "--ram-gib"}


def add_arguments(p) -> None:
    add_config_arguments(p, "train.batch_size=8")
    p.add_argument(
        "--ram-gib",
        type=float,
        default=None,
        help="RAM budget in GiB instead of what this machine has free (also TUNESMITH_RAM_GIB)",
    )
    p.add_argument("--no-probe", action="store_true", help="memory only: skip timing the probe steps")
    p.add_argument("--json", help="also write the estimate as JSON here")


def run(args) -> int:
    from tunesmith.infer.replay import prepare_replay
    from tunesmith.io import write_atomic
    from tunesmith.train.budget import GIB
    from tunesmith.train.fit import estimate
    from tunesmith.train.fit_report import suggest, table, total_line, total_steps, verdict_line

    cfg = load_config_args(args)
    prepare_replay(cfg)  # data.replay_source=self: the sample counts need the base model's answers
    cache: dict = {}
    est = estimate(cfg, probe=not args.no_probe, ram_gib=args.ram_gib, _cache=cache)
    print(table(cfg, est))
    steps = total_steps(cfg, est.processes)
    print(total_line(steps, est.step_s))
    suggestion = None
    if est.fits:
        print(
            f"fits: {est.peak_bytes * est.processes / GIB:.2f} of {est.ram_budget / GIB:.2f} GiB RAM, "
            f"{est.disk_bytes / GIB:.2f} of {est.disk_free / GIB:.2f} GiB disk"
        )
    else:
        if est.fits_disk:
            suggestion = suggest(cfg, est, probe=not args.no_probe, ram_gib=args.ram_gib, cache=cache)
        print("does not fit: " + verdict_line(cfg, est, suggestion).removesuffix(", or pass --force"))
    if args.json:
        report = {
            "fits": est.fits,
            "fits_ram": est.fits_ram,
            "fits_disk": est.fits_disk,
            "peak_bytes": est.peak_bytes,
            "parts": est.parts,
            "step_s": est.step_s,
            "disk_bytes": est.disk_bytes,
            "ram_budget": est.ram_budget,
            "disk_free": est.disk_free,
            "processes": est.processes,
            "params": est.params,
            "trainable": est.trainable,
            "tokens_per_step": est.tokens_per_step,
            "total_steps": steps,
            "total_s": round(steps * est.step_s, 1) if est.step_s else None,
            "warnings": est.warnings,
            "suggestion": None
            if suggestion is None
            else {"overrides": suggestion[0], "peak_bytes": suggestion[1].peak_bytes, "step_s": suggestion[1].step_s},
        }
        write_atomic(args.json, json.dumps(report, indent=2))
    return 0 if est.fits else 1
