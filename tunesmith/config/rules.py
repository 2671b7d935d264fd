"""The range and choice checks of a `Config` that types alone cannot express.

Contract: `validate(cfg)` raises a one-line `UserError` naming the first key whose value is out of
range, not one of its choices, or inconsistent with another key; `load_config` calls it last.
"""

from __future__ import annotations

from tunesmith.config import (
    ATTN_IMPLEMENTATIONS,
    COMPARE_ARMS,
    DATA_FORMATS,
    FROZEN_DTYPES,
    GGUF_QUANTS,
    INFERENCE_PRECISIONS,
    LR_SCHEDULES,
    METHODS,
    OVERLONG,
    PIPELINE_STAGES,
    PRECISIONS,
    PRESETS,
    QUANT_TYPES,
    RETRIEVERS,
    STRATEGIES,
    TRACKERS,
    CompareConfig,
    Config,
    PipelineConfig,
    PretrainConfig,
)
from tunesmith.errors import UserError

# fmt: off
CHOICES = {
    "data.format": DATA_FORMATS, "data.overlong": OVERLONG, "adapter.method": METHODS,
    "adapter.quant_type": QUANT_TYPES, "train.frozen_dtype": FROZEN_DTYPES, "train.lr_schedule": LR_SCHEDULES,
    "train.precision": PRECISIONS, "train.strategy": STRATEGIES, "compare.retriever": RETRIEVERS,
    "model.attn_implementation": ATTN_IMPLEMENTATIONS,
    "compare.precision": INFERENCE_PRECISIONS, "pretrain.preset": PRESETS, "pretrain.method": METHODS,
    "train.report_to": TRACKERS, "compare.report_to": TRACKERS[1:],  # lists: each item
    "train.on_divergence": ("stop", "skip_step"), "data.replay_loss": ("ce", "kl"),
}
# fmt: on
POSITIVE = (
    "adapter.rank adapter.alpha train.epochs train.batch_size train.grad_accum train.lr train.log_every "
    "train.keep_last train.dist_timeout_s compare.top_k compare.chunk_size compare.max_new_tokens "
    "compare.batch_size compare.bootstrap"
).split()
NON_NEGATIVE = (
    "train.max_steps train.weight_decay train.warmup_steps train.max_grad_norm train.threads train.eval_every "
    "train.save_every train.save_every_minutes train.max_skipped_steps compare.k_shot compare.chunk_overlap "
    "compare.max_questions compare.latency_samples compare.threads pretrain.hidden_size pretrain.layers pretrain.heads "
    "pretrain.intermediate_size pretrain.max_steps pretrain.batch_size pretrain.lr"
).split()
# key → (low, high, whether high itself is allowed)
FRACTIONS = {
    "data.val_fraction": (0.0, 1.0, False),
    "adapter.dropout": (0.0, 1.0, False),
    "train.warmup_ratio": (0.0, 1.0, False),
    "train.min_lr_ratio": (0.0, 1.0, True),
    "data.context_fraction": (0.0, 1.0, True),
    "data.context_distractor_only": (0.0, 1.0, True),
    "data.context_counterfactual": (0.0, 1.0, True),
}


def _get(cfg: Config, key: str):
    return getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config key {key}: expected one of {', '.join(allowed)}, got {value!r}")


def _fail(key: str, expected: str, value) -> None:
    raise UserError(f"config key {key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for key, allowed in CHOICES.items():
        for value in _get(cfg, key) if key.endswith("report_to") else [_get(cfg, key)]:
            _choice(key, value, allowed)
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            _fail(key, "a number > 0", _get(cfg, key))
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            _fail(key, "a number >= 0", _get(cfg, key))
    for key, (low, high, closed) in FRACTIONS.items():
        value = _get(cfg, key)
        if not (low <= value <= high if closed else low <= value < high):
            _fail(key, f"{low:g} <= value {'<=' if closed else '<'} {high:g}", value)
    d, a, t = cfg.data, cfg.adapter, cfg.train
    if a.quant_block_size < 2 or a.quant_block_size % 2 or a.quant_block_size > 4096:
        _fail("adapter.quant_block_size", "an even integer from 2 to 4096", a.quant_block_size)
    if d.replay is not None and not 0.0 <= d.replay < 1.0:
        _fail("data.replay", "a fraction 0 <= value < 1 (or null for none)", d.replay)
    if not d.replay_source:
        raise UserError("config key data.replay_source: expected self or a data file/folder")
    if d.max_length < 8:
        _fail("data.max_length", "an integer >= 8", d.max_length)
    if not a.target_modules:
        raise UserError("config key adapter.target_modules: expected at least one module name")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        _fail("train.betas", "two numbers in [0, 1)", t.betas)
    if t.device not in ("auto", "cpu", "cuda", "mps") and not t.device.startswith("cuda:"):
        _fail("train.device", "auto, cpu, cuda, cuda:N or mps", t.device)
    if not t.output_dir:
        raise UserError("config key train.output_dir: expected a directory path")
    if t.forward_tokens != "auto" and not t.forward_tokens.isdigit():
        _fail("train.forward_tokens", "auto or a number of tokens >= 0", t.forward_tokens)
    if d.context and not (d.documents or cfg.compare.documents):
        raise UserError("config key data.documents: data.context needs a documents folder (or compare.documents)")
    _validate_compare(cfg.compare)
    _validate_pretrain(cfg.pretrain, cfg.pipeline)


def _validate_pretrain(p: PretrainConfig, pl: PipelineConfig) -> None:
    if p.hidden_size and p.heads and p.hidden_size % p.heads:
        raise UserError(f"config key pretrain.heads: {p.heads} does not divide pretrain.hidden_size={p.hidden_size}")
    if not 259 <= p.vocab_size <= 1 << 20:
        _fail("pretrain.vocab_size", "259 to 1048576 (256 bytes + 3 special tokens)", p.vocab_size)
    if p.block_size < 8:
        _fail("pretrain.block_size", "an integer >= 8", p.block_size)
    if not 0.0 < p.val_fraction < 0.5:
        _fail("pretrain.val_fraction", "0 < value < 0.5", p.val_fraction)
    if not pl.stages:
        raise UserError("config key pipeline.stages: expected at least one of " + ", ".join(PIPELINE_STAGES))
    for stage in pl.stages:
        _choice("pipeline.stages", stage, PIPELINE_STAGES)
    for quant in pl.export_quants:
        _choice("pipeline.export_quants", quant, GGUF_QUANTS)
    if not pl.output_dir:
        raise UserError("config key pipeline.output_dir: expected a directory path")


def _validate_compare(c: CompareConfig) -> None:
    if not c.arms or len(set(c.arms)) != len(c.arms):
        _fail("compare.arms", "at least one arm, each listed once, of " + ", ".join(COMPARE_ARMS), c.arms)
    for arm in c.arms:
        _choice("compare.arms", arm, COMPARE_ARMS)
    if c.chunk_overlap >= c.chunk_size:
        raise UserError(f"config key compare.chunk_overlap: expected less than compare.chunk_size ({c.chunk_size})")
