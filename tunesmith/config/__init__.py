"""The typed configuration tree: YAML file + `key.sub=value` overrides → `Config`.

Contract:
- `load_config(path, overrides)` returns a fully validated `Config`; any unknown key, wrong
  type or out-of-range value raises `UserError` naming the file/override and the key.
- Override values are YAML scalars (`train.lr=1e-4`); numbers must be finite; a YAML key given twice
  is an error. Relative paths (PATH_KEYS) resolve against the YAML's folder when the YAML gives
  them, against the current directory when an override does; both are stored absolute.
- `save_config(cfg, path)` writes the resolved tree; `load_config(path)` reads it back equal.
- `config_hash(cfg, ignore=...)` fingerprints a config so a run dir can tell whether a
  resume continues the same run. A key's one-line help (`tunesmith config show`) is its trailing
  comment here (or the comment above it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.errors import UserError
from tunesmith.io import load_yaml, write_atomic

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
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")  # K-quants: llama.cpp quantizes
TRACKERS = ("tensorboard", "mlflow", "wandb")  # train.report_to (tunesmith.train.tracking)
PATH_COMPARE = ("run", "questions", "documents", "general_questions", "general_text")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class ModelConfig:
    """Which base model to start from and how to load it."""

    name: str = "smollm2-135m-instruct"  # HF dir · hub id · .gguf file · bundled name
    revision: str | None = None  # hub revision when `name` is a hub id
    trust_remote_code: bool = False  # only when the user asks: runs code shipped with the model
    attn_implementation: str = "sdpa"  # sdpa · eager


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token rows."""

    train: list[str] = field(default_factory=list)  # files, dataset/shard folders, hub names; one string is accepted
    validation: list[str] = field(default_factory=list)
    split: str = "train"  # split read from sources that have several (DatasetDict folder, shard folder, hub)
    validation_split: str | None = None  # of data.validation sources (default validation), else of data.train's
    subset: str | None = None  # hub dataset configuration name
    columns: dict[str, str] = field(default_factory=dict)  # format field → record key, e.g. {instruction: question}
    val_fraction: float = 0.0  # held out of `train` when no validation data is given
    format: str = "auto"
    max_length: int = 512  # tokens per sample (and per packed row)
    overlong: str = "truncate"  # what to do with samples longer than max_length
    train_on_prompt: bool = False  # loss on prompt tokens too
    packing: bool = True
    system_prompt: str | None = None  # prepended to every conversation without one
    chat_template: str | None = None  # Jinja template overriding the tokenizer's
    cache_dir: str | None = None  # tokenised-data cache; default TUNESMITH_HOME/data-cache
    context: bool = False  # also train on copies whose question carries retrieved chunks, as compare's RAG arms ask
    documents: str | None = None  # folder data.context retrieves from; default compare.documents
    context_fraction: float = 1.0  # share of the conversations that get a copy with context (plain ones stay)
    context_distractor_only: float = 0.2  # share of those copies whose chunks leave out the answer's chunk
    context_counterfactual: float = 0.0  # share of the copies with the answer's chunk whose answer is swapped
    replay: float | None = None  # share of training samples that are replay (against forgetting), 0 <= f < 1
    replay_source: str = "self"  # self (the base model's answers to bundled prompts) · a data file/folder
    replay_loss: str = "ce"  # ce: cross-entropy on replay answers · kl: KL to the base model's next-token distribution


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
    fused: bool = True  # lora/dora: fused forward/backward (adapters.fused_lora, fused_dora); false = PEFT's own


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
    save_every: int = 0  # steps between checkpoints; 0 = only at the end (and every save_every_minutes)
    save_every_minutes: float = 10.0  # minutes between checkpoints besides save_every; 0 = off
    keep_last: int = 2  # checkpoints kept on disk
    resume: str = "never"  # never · auto · path to a checkpoint dir
    tensorboard: bool = False  # old spelling of report_to: [tensorboard]
    report_to: list[str] = field(default_factory=list)  # trackers, any of tensorboard · mlflow · wandb
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
    precision: str = "auto"  # arms' weights: auto (bf16 where bf16 matmuls pay, as train.precision) · fp32 · bf16
    max_questions: int = 0  # per split, 0 = all (a quick look at a big set)
    latency_samples: int = 8  # questions per arm answered one at a time for latency p50/p95
    bootstrap: int = 1000
    seed: int = 0
    report_to: list[str] = field(default_factory=list)  # log the score table to the run's trackers: mlflow · wandb
    splits: dict[str, str] = field(default_factory=dict)  # your split names → seen · doc_only · general
    threads: int = 0  # torch intra-op threads for the arms; 0 = torch's default


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
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        for section, names in PATH_KEYS.items():
            node = raw.get(section)
            for name in names if isinstance(node, dict) else ():
                if name in node:
                    node[name] = _absolute(node[name], Path(path).resolve().parent)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key.sub=value")
        parsed = load_yaml(value, f"override {item[:60]!r}", or_text=True) if value != "" else ""
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
            node = child
        in_cwd = parts[-1] in PATH_KEYS.get(".".join(parts[:-1]), ())
        node[parts[-1]] = _absolute(parsed, Path.cwd()) if in_cwd else parsed
    cfg = _build(Config, raw, "")
    from tunesmith.config.rules import validate  # the range and choice checks

    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, (dict, type(None))):
        raise UserError(f"{path}: expected a mapping of sections (model, data, adapter, train)")
    return data or {}


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config key {prefix.rstrip('.') or '<root>'}: expected a section (mapping)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise UserError(f"config key {prefix}{key}: unknown; expected one of {', '.join(sorted(names))}")
    return cls(**{name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()})


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
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping like {{a: b}}, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
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
    if hint is int:  # a 64-bit one: seeds and counts end up in C code
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
            return value
        raise UserError(f"config key {key}: expected an integer, got {str(value)[:40]!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise UserError(f"config key {key}: expected a finite number, got {str(value)[:40]!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            if any("\ud800" <= c <= "\udfff" for c in str(value)):
                raise UserError(f"config key {key}: an unpaired surrogate (\\ud800-\\udfff) is not Unicode text")
            return str(value)
        raise UserError(f"config key {key}: expected a string, got {value!r}")
    raise UserError(f"config key {key}: expected {'a mapping' if origin is dict else hint}, got {value!r}")


# section → keys holding paths (or lists of paths)
# `owner/name` or `name`: a hub dataset when no such file exists (tunesmith.data.sources)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
PATH_KEYS = {
    "data": ("train", "validation", "documents", "replay_source"),
    "pretrain": ("corpus",),
    "compare": tuple(PATH_COMPARE),
}


def _absolute(value, base: Path):
    """A relative path (or a list of them) made absolute against `base`; other values as they are."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or value in ("", "bundled", "self"):  # self: data.replay_source
        return value
    path = Path(value).expanduser()
    if not path.suffix and HUB_NAME.match(value) and not (base / path).exists():
        return value  # a hub dataset name, not a path
    return str(path if path.is_absolute() else base / path)


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def config_hash(cfg: Config, ignore: tuple[str, ...] = ()) -> str:
    """A stable fingerprint of the config, leaving out dotted keys in `ignore`."""
    tree = dataclasses.asdict(cfg)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node.pop(last, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]
