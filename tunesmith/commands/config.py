"""`tunesmith config show [CONFIG] [key=value ...]` and `tunesmith config keys`: the configuration, readable.

`show` prints every key of the resolved config (file + overrides, validated as `train` would) with
its value, its default when the value differs, and a one-line help; `keys` lists every key with its
type, default and help. A key's help is its trailing comment in `tunesmith/config.py` (or the comment
lines just above it), read at run time; the few keys without one take it from `HELP` here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing

from tunesmith.commands import add_config_arguments, load_config_args

HELP = "print the resolved config (show) or every key (keys), with defaults and a one-line help"

# keys whose line in config.py carries no comment
KEY_HELP = {
    "model.attn_implementation": "attention kernel for model loading: sdpa · eager",
    "data.validation": "validation files (same formats as data.train)",
    "data.format": "auto (detected from the first record's keys) · alpaca · messages · sharegpt · "
    "prompt_completion · text",
    "data.packing": "pack several samples into each row of data.max_length tokens",
    "adapter.method": "full · lora · dora · qlora",
    "adapter.rank": "LoRA rank r",
    "adapter.alpha": "LoRA scale numerator (scale = alpha / rank)",
    "adapter.dropout": "dropout on the adapter's input (0 = none)",
    "adapter.target_modules": "modules that get adapters; all-linear = every linear layer but the head",
    "train.output_dir": "the run dir: model, metrics, checkpoints",
    "train.epochs": "passes over the data when max_steps is 0",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.lr": "peak learning rate",
    "train.weight_decay": "AdamW weight decay on matrices",
    "train.betas": "AdamW betas",
    "train.warmup_steps": "linear warm-up steps; 0 = warmup_ratio of the run",
    "train.lr_schedule": "cosine · linear · constant after warm-up",
    "train.seed": "seed for data order, dropout and initialisation",
    "train.gradient_checkpointing": "recompute activations in backward: less memory, ~30% slower",
    "train.log_every": "steps between metrics rows",
    "train.progress": "show the progress bar",
    "compare.arms": "arms to run: base · prompt · rag · finetuned · finetuned_rag",
    "compare.prompt_system": "system prompt of the prompt arm",
    "compare.retriever": "bm25 · dense (all-MiniLM-L6-v2) · hybrid",
    "compare.top_k": "chunks retrieved per question",
    "compare.chunk_overlap": "words shared by neighbouring chunks",
    "compare.max_new_tokens": "tokens generated per answer",
    "compare.batch_size": "questions answered together",
    "compare.bootstrap": "bootstrap resamples for the confidence intervals",
    "compare.seed": "seed for the k-shot draw and the bootstrap",
    "pretrain.layers": "decoder layers; 0 = the preset's",
    "pretrain.heads": "attention heads; 0 = the preset's",
    "pretrain.intermediate_size": "MLP width; 0 = the preset's",
    "pipeline.output_dir": "where the pipeline's stages write",
    "pipeline.stages": "stages in order: pretrain · finetune · merge · export · compare",
    "pipeline.export_quants": "GGUF files the export stage writes: f32 · f16 · q8_0 · q4_0",
}


def add_arguments(p) -> None:
    p.add_argument("action", choices=("show", "keys"), help="show: the resolved config; keys: every key")
    add_config_arguments(p)


def run(args) -> int:
    try:
        _print(args)
    except BrokenPipeError:  # `tunesmith config keys | head`
        sys.stderr.close()
    return 0


def _print(args) -> None:
    from tunesmith.config import Config

    helps = key_help()
    if args.action == "keys":
        for key, (kind, default) in defaults(Config()).items():
            print(f"{key}  ({kind}, default {_show(default)})  {helps.get(key, '')}")
        return
    resolved, base = defaults(load_config_args(args)), defaults(Config())
    width = min(max(len(k) + len(_show(v)) for k, (_, v) in resolved.items()) + 3, 52)
    for key, (_, value) in resolved.items():
        default = base[key][1]
        left = f"{key} = {_show(value)}"
        note = "default" if value == default else f"default {_show(default)}"
        print(f"{left:<{width}} # ({note}) {helps.get(key, '')}")


def _show(value) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def defaults(cfg) -> dict[str, tuple[str, object]]:
    """`section.key → (type name, value)` for every key of `cfg`, in the order of config.py."""
    from tunesmith.config import Config

    hints = typing.get_type_hints(Config)
    out = {}
    for section in dataclasses.fields(Config):
        node, types = getattr(cfg, section.name), typing.get_type_hints(hints[section.name])
        for f in dataclasses.fields(node):
            hint = types[f.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            out[f"{section.name}.{f.name}"] = (kind, getattr(node, f.name))
    return out


def key_help() -> dict[str, str]:
    """Every key's one-line help: config.py's comments, then `KEY_HELP`."""
    import tunesmith.config as config_module

    source = inspect.getsource(config_module)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    sections = {f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in _config_fields()}
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in sections:
            continue
        for stmt in node.body:
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            text = comments.get(stmt.end_lineno) or comments.get(stmt.lineno)
            if not text:  # a comment block right above the field
                above, row = [], stmt.lineno - 1
                while row >= 1 and lines[row - 1].strip().startswith("#"):
                    above.insert(0, comments.get(row, ""))
                    row -= 1
                text = " ".join(above)
            if text:
                found[f"{sections[node.name]}.{stmt.target.id}"] = text
    return {**KEY_HELP, **found}


def _config_fields():
    from tunesmith.config import Config

    return dataclasses.fields(Config)
