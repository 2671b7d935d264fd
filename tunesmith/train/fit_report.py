"""What `fit` says: the overrides that make a run fit, the one-line refusal, and the table.

Contract:
- `suggest(cfg, est)` re-estimates a few concrete overrides (split forwards, gradient checkpointing,
  smaller micro-batches with more accumulation, lora/qlora, shorter rows) and returns the first set
  that fits, as `key=value` strings with its estimate, or None.
- `verdict_line(cfg, est, suggestion)`: the one-line refusal (empty when the run fits).
- `table(cfg, est)`: the breakdown `tunesmith fit` prints, then the estimate's warnings.
- `preflight(cfg)`: what `train` runs first — the estimate, or a one-line `UserError` naming
  overrides that fit.
- `total_steps(cfg, processes)`: the optimizer steps the run will take (the training loop's own
  formula over the rows the data makes); `total_line(steps, step_s)` the line `fit` prints with
  the predicted total time.
"""

from __future__ import annotations

import copy
import math

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.train.budget import GIB, unwritable
from tunesmith.train.fit import Estimate, estimate


def _methods_allowed() -> tuple[str, ...]:
    from tunesmith.config import METHODS

    return METHODS


def _candidates(cfg: Config):
    """Overrides in order of least harm: same result slower (forwards of fewer tokens, then
    recomputed activations), then fewer trainable weights, then shorter rows (which changes what
    the model sees). fp32 compute where `auto` chose bf16 is not one: with the bf16 fast paths it
    peaks no lower (SmolLM2: LoRA 1.47 vs 1.78 GiB, full 2.78 vs 2.76; bench/NOTES.md)."""
    from tunesmith.train.rows import forward_budget

    t = cfg.train
    if t.batch_size > 1 and not 0 < forward_budget(cfg) <= cfg.data.max_length:
        yield [f"train.forward_tokens={cfg.data.max_length}"]  # one row's worth per forward
    if not t.gradient_checkpointing:
        yield ["train.gradient_checkpointing=true"]
    bs = t.batch_size
    while bs > 1:
        bs //= 2
        accum = t.grad_accum * math.ceil(t.batch_size / bs)
        yield [f"train.batch_size={bs}", f"train.grad_accum={accum}"]
    if cfg.adapter.method == "full":
        yield ["adapter.method=lora"]
    if cfg.adapter.method != "qlora" and "qlora" in _methods_allowed():
        yield ["adapter.method=qlora"]
    length = cfg.data.max_length
    while length > 64:
        length //= 2
        yield [f"data.max_length={length}"]


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of cfg with `key=value` overrides (no validation: qlora may be a suggestion only)."""
    import yaml

    new = copy.deepcopy(cfg)
    for item in overrides:
        key, _, value = item.partition("=")
        section, name = key.split(".")
        setattr(getattr(new, section), name, yaml.safe_load(value))
    return new


def suggest(cfg: Config, est: Estimate, probe: bool = True, ram_gib: float | None = None, cache: dict | None = None):
    """The first single override that fits, else the overrides accumulated in order; None when
    even all of them together do not fit."""
    cache = {} if cache is None else cache
    singles = list(_candidates(cfg))
    for overrides in singles:
        trial = estimate(apply_overrides(cfg, overrides), probe=probe, ram_gib=ram_gib, _cache=cache)
        if trial.fits:
            return overrides, trial
    chosen: dict[str, str] = {}
    current = cfg
    for overrides in singles:
        for item in overrides:
            chosen[item.split("=")[0]] = item
        current = apply_overrides(cfg, list(chosen.values()))
        trial = estimate(current, probe=probe, ram_gib=ram_gib, _cache=cache)
        if trial.fits:
            return list(chosen.values()), trial
    return None


def verdict_line(cfg: Config, est: Estimate, suggestion) -> str:
    """The one-line refusal (or the empty string when the run fits)."""
    if est.fits:
        return ""
    if not est.fits_disk and unwritable(cfg.train.output_dir):
        return f"config key train.output_dir: {unwritable(cfg.train.output_dir)}; choose another dir"
    if not est.fits_disk:
        return (
            f"this run needs {est.disk_bytes / GIB:.2f} GiB of disk for checkpoints and the model but "
            f"{cfg.train.output_dir} has {est.disk_free / GIB:.2f} GiB free; lower train.keep_last or "
            "choose another train.output_dir (or pass --force)"
        )
    need = est.peak_bytes * est.processes / GIB
    line = f"predicted peak RAM {need:.2f} GiB exceeds the {est.ram_budget / GIB:.2f} GiB available"
    if suggestion is None:
        return (
            line + "; no single change makes it fit: use a smaller model or a machine with more RAM (or pass --force)"
        )
    overrides, trial = suggestion
    return (
        line
        + f"; try {' '.join(overrides)} (predicted {trial.peak_bytes * trial.processes / GIB:.2f} GiB), or pass --force"
    )


def table(cfg: Config, est: Estimate) -> str:
    """The human-readable breakdown printed by `tunesmith fit`."""
    rows = [("part", "GiB")]
    rows += [(name, f"{value / GIB:.3f}") for name, value in est.parts.items()]
    rows.append(("peak RSS (predicted)", f"{est.peak_bytes / GIB:.3f}"))
    if est.processes > 1:
        rows.append((f"× {est.processes} processes", f"{est.peak_bytes * est.processes / GIB:.3f}"))
    rows.append(("RAM budget", f"{est.ram_budget / GIB:.3f}"))
    rows.append(("disk needed", f"{est.disk_bytes / GIB:.3f}"))
    rows.append(("disk free", f"{est.disk_free / GIB:.3f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>9}" for a, b in rows]
    lines.insert(1, "-" * (width + 11))
    head = (
        f"{cfg.adapter.method} on {cfg.model.name}: {est.params:,} parameters, {est.trainable:,} trainable; "
        f"batch {cfg.train.batch_size}×{cfg.train.grad_accum}, rows ≤{cfg.data.max_length} tokens"
        + (", gradient checkpointing" if cfg.train.gradient_checkpointing else "")
    )
    speed = (
        f"predicted {est.step_s:.2f} s/step (~{est.tokens_per_step / est.step_s:,.0f} tok/s)"
        if est.step_s
        else "s/step: not probed"
    )
    return "\n".join([head, *lines, speed, *(f"warning: {w}" for w in est.warnings)])


def total_steps(cfg: Config, processes: int = 1) -> int:
    from pathlib import Path

    from tunesmith.data.sft import build_datasets, ensure_chat_template
    from tunesmith.models import load_tokenizer, resolve_model, tunesmith_home
    from tunesmith.train.rows import make_rows

    t, d = cfg.train, cfg.data
    if t.max_steps:
        return t.max_steps
    tok = load_tokenizer(resolve_model(cfg.model.name), cfg.model.trust_remote_code, cfg.model.revision)
    ensure_chat_template(tok, d.chat_template)
    cache = Path(d.cache_dir) if d.cache_dir else tunesmith_home() / "data-cache"
    train, _, _ = build_datasets(d, tok, t.seed, cache, cfg.compare)
    rows = len(make_rows(train, d.packing, d.max_length, tok.pad_token_id))
    per_epoch = rows - rows % processes  # as RowStream: every rank gets as many rows
    steps_per_epoch = max(1, math.ceil(per_epoch / (t.batch_size * t.grad_accum * processes)))
    return max(1, math.ceil(t.epochs * steps_per_epoch))


def total_line(steps: int, step_s: float | None) -> str:
    if not step_s:
        return f"total: {steps} steps (time not probed)"
    total = steps * step_s
    clock = f"{int(total // 3600)}:{int(total % 3600 // 60):02d}:{int(total % 60):02d}"
    return f"total: {steps} steps × {step_s:.2f} s/step ≈ {clock} (h:mm:ss at the probed s/step)"


def preflight(cfg: Config, probe: bool = False, ram_gib: float | None = None, cache: dict | None = None) -> Estimate:
    """What `train` runs first: the estimate, or a one-line `UserError` naming overrides that fit."""
    cache = {} if cache is None else cache
    est = estimate(cfg, probe=probe, ram_gib=ram_gib, _cache=cache)
    if not est.fits:
        suggestion = suggest(cfg, est, probe=False, ram_gib=ram_gib, cache=cache) if est.fits_disk else None
        raise UserError(verdict_line(cfg, est, suggestion))
    return est
