"""`tunesmith fit [CONFIG] [key=value ...] [--ram-gib N] [--no-probe] [--json PATH]` → `tunesmith.fit`.

Prints the predicted peak RAM (by part), seconds per step and disk need, and whether the run
fits; exit 0 when it does, 1 when it does not (with the overrides that would make it fit).
"""

import json
from pathlib import Path

from tunesmith.commands.train import config_from_args


def run(args) -> int:
    from tunesmith import fit

    cfg = config_from_args(args)
    cache: dict = {}
    est = fit.estimate(cfg, probe=not args.no_probe, ram_gib=args.ram_gib, _cache=cache)
    print(fit.table(cfg, est))
    suggestion = None
    if est.fits:
        print(f"fits: {est.peak_bytes * est.processes / fit.GIB:.2f} of {est.ram_budget / fit.GIB:.2f} GiB RAM, "
              f"{est.disk_bytes / fit.GIB:.2f} of {est.disk_free / fit.GIB:.2f} GiB disk")
    else:
        if est.fits_disk:
            suggestion = fit.suggest(cfg, est, probe=not args.no_probe, ram_gib=args.ram_gib, cache=cache)
        print("does not fit: " + fit.verdict_line(cfg, est, suggestion).removesuffix(", or pass --force"))
    if args.json:
        report = {
            "fits": est.fits, "fits_ram": est.fits_ram, "fits_disk": est.fits_disk,
            "peak_bytes": est.peak_bytes, "parts": est.parts, "step_s": est.step_s,
            "disk_bytes": est.disk_bytes, "ram_budget": est.ram_budget, "disk_free": est.disk_free,
            "processes": est.processes, "params": est.params, "trainable": est.trainable,
            "tokens_per_step": est.tokens_per_step,
            "suggestion": None if suggestion is None else {
                "overrides": suggestion[0], "peak_bytes": suggestion[1].peak_bytes, "step_s": suggestion[1].step_s},
        }
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if est.fits else 1
