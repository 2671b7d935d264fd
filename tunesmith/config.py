"""The typed configuration tree: YAML file + `key.sub=value` overrides → `Config`.

Contract:
- `load_config(path, overrides)` returns a fully validated `Config`; any unknown key, wrong
  type or out-of-range value raises `UserError` naming the file/override and the key.
- Values in overrides are parsed as YAML scalars (`train.lr=1e-4`, `data.packing=false`).
- `save_config(cfg, path)` writes the resolved tree; `load_config(path)` reads it back equal.
- `config_hash(cfg, ignore=...)` fingerprints a config: does a resume continue the same run?
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.errors import UserError
from tunesmith.io import write_atomic

DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
METHODS = ("full", "lora", "dora", "qlora")
QUANT_TYPES = ("nf4", "int4")
FROZEN_DTYPES = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")  # under torchrun; one process ignores it
OVERLONG = ("truncate", "drop")
COMPARE_ARMS = ("base", "prompt", "rag", "finetuned", "finetuned_rag")
RETRIEVERS = ("bm25", "dense", "hybrid")
PRESETS = ("tiny", "small", "base")
PIPELINE_STAGES = ("pretrain", "finetune", "merge", "export", "compare")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0")


@dataclass
class ModelConfig:
    """Which base model to start from and how to load it."""

    name: str = "smollm2-135m-instruct"  # HF dir · hub id · .gguf file · bundled name
    revision: str | None = None  # hub revision when `name` is a hub id
    trust_remote_code: bool = False  # only when the user asks: runs code shipped with the model
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token rows."""

    train: list[str] = field(default_factory=list)  # files; a single string is accepted
    validation: list[str] = field(default_factory=list)
    val_fraction: float = 0.0  # held out of `train` when no validation files are given
    format: str = "auto"
    max_length: int = 512  # tokens per sample (and per packed row)
    overlong: str = "truncate"  # what to do with samples longer than max_length
    train_on_prompt: bool = False  # loss on prompt tokens too
    packing: bool = True
    system_prompt: str | None = None  # prepended to every conversation without one
    chat_template: str | None = None  # Jinja template overriding the tokenizer's
    cache_dir: str | None = None  # tokenised-data cache; default TUNESMITH_HOME/data-cache


@dataclass
class AdapterConfig:
    """Fine-tuning method: all weights (`full`) or a PEFT adapter."""

    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    quant_type: str = "nf4"  # qlora: nf4 (QLoRA's NormalFloat) · int4 (asymmetric, as GGUF Q4_1)
    quant_block_size: int = 64  # qlora: weights sharing one scale (int4: 32 matches GGUF Q4_1)
    double_quant: bool = True  # qlora: store the NF4 scales in 8 bits too
    quantize_embeddings: bool = False  # qlora: NF4 for the input embeddings and output head too
    fused: bool = True  # lora: fused LoRA forward/backward (tunesmith.adapters.fused_lora); false = PEFT's own


@dataclass
class TrainConfig:
    """The optimisation loop, logging and checkpoints."""

    output_dir: str = "out/run"
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    batch_size: int = 4  # rows per micro-batch (per process)
    grad_accum: int = 1
    # split a micro-batch into forwards of at most this many real tokens; 0 = one forward;
    # auto = one packed row's worth (data.max_length) with packing, else 0
    forward_tokens: str = "auto"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_ratio: float = 0.05  # used when warmup_steps is 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # floor of the schedule, as a fraction of lr
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    precision: str = "auto"  # auto (bf16 where the hardware has bf16 matmul units, else fp32) · fp32 · bf16 · fp16
    device: str = "auto"  # auto · cpu · cuda · cuda:N
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    gradient_checkpointing: bool = False
    padding_free: bool = True  # a micro-batch runs as one row of real tokens, attention per sample
    fused_mlp: bool = True  # SwiGLU + down projection as one node that saves 2 of 4 intermediates
    fused_norm: bool = True  # RMSNorm as one node that saves its input; bf16 out under bf16 compute
    fused_rope: bool = True  # RoPE inside the per-sample attention node (CPU, padding-free rows)
    # q/k/v and gate/up as one GEMM each: LoRA over a frozen base, or full in bf16 (one process)
    fused_groups: bool = True
    # storage of weights that do not train (lora, dora, qlora): auto (bf16 when computing in bf16) · fp32 · bf16
    frozen_dtype: str = "auto"
    log_every: int = 1
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    resume: str = "never"  # never · auto · path to a checkpoint dir
    tensorboard: bool = False
    progress: bool = True
    strategy: str = "ddp"  # under torchrun: ddp (whole model per process) · fsdp (sharded)
    dist_timeout_s: float = 600.0  # a collective waiting longer (dead or hung process) stops the run
    on_divergence: str = "stop"  # non-finite loss/gradient: stop (exit 3) · skip_step (drop that update)
    max_skipped_steps: int = 10  # skip_step: the most updates a run may drop before it stops


@dataclass
class CompareConfig:
    """`tunesmith compare`: which arms answer which questions, and how they are scored."""

    run: str | None = None  # finished run dir; unset = train (or reuse) the run this config describes
    questions: str | None = None  # jsonl/json/csv: question, answer, optional fact_id and split
    documents: str | None = None  # folder of .txt/.md/.jsonl files the RAG arms retrieve from
    general_questions: str = "bundled"  # forgetting control set; "" switches it off
    general_text: str = "bundled"  # perplexity text for forgetting; "" switches it off
    arms: list[str] = field(default_factory=lambda: list(COMPARE_ARMS))
    output_dir: str | None = None  # default: <run>/compare
    system_prompt: str | None = None  # base and fine-tuned arms; default: the run's data.system_prompt
    prompt_system: str = (
        "You are an expert on the user's domain. Answer with the exact name, number or term, in one short sentence."
    )
    k_shot: int = 4  # few-shot examples for the prompt arm, drawn from the training data
    retriever: str = "bm25"
    top_k: int = 3
    chunk_size: int = 120  # words per document chunk
    chunk_overlap: int = 20
    max_new_tokens: int = 48
    batch_size: int = 16
    # weights the arms generate with: auto (bf16 where bf16 matmuls pay, as train.precision) · fp32 · bf16
    precision: str = "auto"
    max_questions: int = 0  # per split, 0 = all (a quick look at a big set)
    latency_samples: int = 8  # questions per arm answered one at a time for latency p50/p95
    bootstrap: int = 1000
    seed: int = 0


@dataclass
class PretrainConfig:
    """Pre-training on raw text (`tunesmith pretrain`, the pipeline's pretrain stage)."""

    corpus: list[str] = field(default_factory=list)  # .txt/.md files, .jsonl with `text`, folders of them
    from_scratch: bool = False  # train a tokenizer + a new Llama model; else continue model.name
    preset: str = "tiny"  # tiny ≈ 1M · small ≈ 10M · base ≈ 50M parameters (at vocab 4096)
    hidden_size: int = 0  # explicit dimensions; 0 = the preset's
    layers: int = 0
    heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 4096  # byte-level BPE vocabulary trained from the corpus (from scratch)
    block_size: int = 256  # tokens per training row
    val_fraction: float = 0.05  # share of blocks held out for validation (at most 512 blocks)
    method: str = "full"  # continued pre-training: full · lora · dora (from scratch is always full)
    max_steps: int = 0  # 0 = train.max_steps / train.epochs
    lr: float = 0.0  # 0 = train.lr
    batch_size: int = 0  # 0 = train.batch_size


@dataclass
class PipelineConfig:
    """`tunesmith pipeline`: which stages run, where, and what the export stage writes."""

    output_dir: str = "out/pipeline"
    stages: list[str] = field(default_factory=lambda: ["finetune", "merge", "export"])
    export_quants: list[str] = field(default_factory=lambda: ["f16"])
    verify: bool = True  # check each GGUF in llama.cpp when llama-cpp-python is installed


@dataclass
class Config:
    """The whole tree; every output dir holds its resolved copy as `tunesmith.yaml`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (optional), apply `key.sub=value` overrides, validate."""
    raw: dict = _read_yaml(Path(path)) if path is not None else {}
    base_dir = Path(path).resolve().parent if path is not None else None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parsed
    cfg = _build(Config, raw, "")
    _resolve_paths(cfg, base_dir)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, data, adapter, train)")
    return data


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config key {prefix.rstrip('.') or '<root>'}: expected a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise UserError(f"config key {prefix}{key}: unknown; expected one of {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key {key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _resolve_paths(cfg: Config, base_dir: Path | None) -> None:
    """Data paths in a YAML file are relative to that file, like axolotl's."""
    if base_dir is None:
        return

    def fix(p: str) -> str:
        path = Path(p).expanduser()
        if path.is_absolute() or path.exists():
            return str(path)
        candidate = base_dir / path
        return str(candidate) if candidate.exists() else str(path)

    cfg.data.train = [fix(p) for p in cfg.data.train]
    cfg.data.validation = [fix(p) for p in cfg.data.validation]
    cfg.pretrain.corpus = [fix(p) for p in cfg.pretrain.corpus]
    c = cfg.compare
    for key in ("run", "questions", "documents", "general_questions", "general_text"):
        value = getattr(c, key)
        if value and value != "bundled":
            setattr(c, key, fix(value))


# fmt: off
CHOICES = {
    "data.format": DATA_FORMATS, "data.overlong": OVERLONG, "adapter.method": METHODS,
    "adapter.quant_type": QUANT_TYPES, "train.frozen_dtype": FROZEN_DTYPES, "train.lr_schedule": LR_SCHEDULES,
    "train.precision": PRECISIONS, "train.strategy": STRATEGIES, "compare.retriever": RETRIEVERS,
    "compare.precision": INFERENCE_PRECISIONS, "pretrain.preset": PRESETS, "pretrain.method": METHODS,
    "train.on_divergence": ("stop", "skip_step"),
}
# fmt: on
POSITIVE = (
    "adapter.rank adapter.alpha train.epochs train.batch_size train.grad_accum train.lr train.log_every "
    "train.keep_last train.dist_timeout_s compare.top_k compare.chunk_size compare.max_new_tokens "
    "compare.batch_size compare.bootstrap"
).split()
NON_NEGATIVE = (
    "train.max_steps train.weight_decay train.warmup_steps train.max_grad_norm "
    "train.threads train.eval_every train.save_every train.max_skipped_steps compare.k_shot compare.chunk_overlap "
    "compare.max_questions compare.latency_samples pretrain.hidden_size pretrain.layers pretrain.heads "
    "pretrain.intermediate_size pretrain.max_steps pretrain.batch_size pretrain.lr"
).split()
# key → (low, high, whether high itself is allowed)
FRACTIONS = {
    "data.val_fraction": (0.0, 1.0, False),
    "adapter.dropout": (0.0, 1.0, False),
    "train.warmup_ratio": (0.0, 1.0, False),
    "train.min_lr_ratio": (0.0, 1.0, True),
}


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config key {key}: expected one of {', '.join(allowed)}, got {value!r}")


def _fail(key: str, expected: str, value) -> None:
    raise UserError(f"config key {key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for key, allowed in CHOICES.items():
        _choice(key, _get(cfg, key), allowed)
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
    if not c.arms:
        raise UserError("config key compare.arms: expected at least one of " + ", ".join(COMPARE_ARMS))
    for arm in c.arms:
        _choice("compare.arms", arm, COMPARE_ARMS)
    if len(set(c.arms)) != len(c.arms):
        raise UserError(f"config key compare.arms: an arm is listed twice in {c.arms}")
    if c.chunk_overlap >= c.chunk_size:
        raise UserError(f"config key compare.chunk_overlap: expected less than compare.chunk_size ({c.chunk_size})")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: Config, ignore: tuple[str, ...] = ()) -> str:
    """A stable fingerprint of the config, leaving out dotted keys in `ignore`."""
    tree = to_dict(cfg)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node.pop(last, None)
    blob = json.dumps(tree, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
