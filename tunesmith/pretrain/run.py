"""Pre-training: from scratch (new tokenizer + Llama preset) or continued, through the one training loop.

Contract: `run_pretrain(cfg, output_dir=None) -> dict` trains on `cfg.pretrain.corpus` and
writes an ordinary run dir (`output_dir`, default `train.output_dir`) that `transformers`
loads and that fine-tuning, merge and export accept:
  - from scratch: a byte-level BPE tokenizer of `pretrain.vocab_size` is trained on the corpus
    (cached), a randomly initialised Llama of the preset's (or explicit) size is written once
    under `TUNESMITH_HOME/models/scratch-<key>` and trained in full;
  - continued: `model.name` is trained further, in full or with a LoRA/DoRA adapter
    (`pretrain.method`), after checking that its tokenizer fits its embedding matrix.
The text is tokenised once into a cached memmap (`textdata.token_stream`), cut into blocks of
`pretrain.block_size` with a held-out validation share, and fed to `train.loop.run_training`
as lazy rows, so checkpoints, exact resume, metrics and loss curves are the fine-tuning ones.
`pretrain.max_steps/lr/batch_size`, when set, replace the `train.*` values. The output dir is
locked for the whole run and may not hold a corpus file.
The result (also `pretrain.json` in the run dir) holds the corpus statistics, its unigram
entropy (bits per token and per byte), the validation loss, perplexity and bits per byte,
the base model's before training (continued) and a sampled continuation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from contextlib import nullcontext
from pathlib import Path

from tunesmith.config import CompareConfig, Config, DataConfig, PipelineConfig, PretrainConfig
from tunesmith.errors import UserError
from tunesmith.io import check_not_input, replace_dir, write_atomic
from tunesmith.models import tunesmith_home
from tunesmith.pretrain import textdata
from tunesmith.pretrain.presets import count_params, dimensions, model_config

SUMMARY = "pretrain.json"


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else tunesmith_home() / "data-cache"


def stage_config(cfg: Config, model_name: str, output_dir: str) -> Config:
    """The config the training loop sees: only what shapes this run (its hash decides resume)."""
    p, t = cfg.pretrain, copy.deepcopy(cfg.train)
    t.output_dir = output_dir
    t.max_steps = p.max_steps or t.max_steps
    t.lr = p.lr or t.lr
    t.batch_size = p.batch_size or t.batch_size
    adapter = copy.deepcopy(cfg.adapter)
    adapter.method = "full" if p.from_scratch else p.method
    model = copy.deepcopy(cfg.model)
    model.name = model_name
    return Config(
        model=model,
        data=DataConfig(max_length=p.block_size, cache_dir=cfg.data.cache_dir),
        adapter=adapter,
        train=t,
        compare=CompareConfig(),
        pretrain=copy.deepcopy(p),
        pipeline=PipelineConfig(),
    )


def scratch_model_dir(cfg: Config, tokenizer, corpus_key: str) -> Path:
    """Random-initialised model + tokenizer as an HF dir, written once per (corpus, size, seed)."""
    import os
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    p = cfg.pretrain
    dims = dimensions(p)
    key = hashlib.sha256(
        json.dumps([corpus_key, len(tokenizer), dims, p.block_size, cfg.train.seed]).encode()
    ).hexdigest()[:16]
    target = tunesmith_home() / "models" / f"scratch-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    config = model_config(p, len(tokenizer), tokenizer, max_positions=max(p.block_size, 512))
    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(config).float()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target


def check_vocab(resolved: str, tokenizer) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(
            f"model {resolved}: its tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{vocab} rows (config.json vocab_size); tokenizer and model do not belong together"
        )


def validation_loss(model, rows, batch_size: int, pad_id: int) -> float:
    from tunesmith.data.packing import collate
    from tunesmith.train.distributed import Dist
    from tunesmith.train.loss import LossModule
    from tunesmith.train.step import evaluate

    device = next(model.parameters()).device
    return evaluate(LossModule(model), rows, batch_size, lambda r: collate(r, pad_id), device, Dist(), nullcontext)


def sample_text(model, tokenizer, tokens, block_size: int, first_block: int, n_new: int = 60, seed: int = 0) -> dict:
    """A sampled continuation of the first words of a validation block (printed, and kept in pretrain.json)."""
    import torch

    start = first_block * block_size
    prompt_ids = [int(i) for i in tokens[start : start + 12]]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n_new,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            pad_token_id=tokenizer.pad_token_id,
        )
    return {
        "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
        "continuation": tokenizer.decode(out[0, len(prompt_ids) :].tolist(), skip_special_tokens=True),
    }


def run_pretrain(cfg: Config, output_dir: str | None = None) -> dict:
    from tunesmith.rundir import RunDir

    out = output_dir or cfg.train.output_dir
    check_not_input(out, textdata.corpus_files(cfg.pretrain.corpus), key="train.output_dir")
    with RunDir(out).writing():  # the output lock for the whole run, pretrain.json included
        return _pretrain(cfg, out)


def _pretrain(cfg: Config, out: str) -> dict:
    from tunesmith.data.sft import DataStats
    from tunesmith.models import load_model, load_tokenizer, resolve_model
    from tunesmith.pretrain.tokenizer import cached_tokenizer
    from tunesmith.train.loop import run_training

    p: PretrainConfig = cfg.pretrain
    files = textdata.corpus_files(p.corpus)
    key = textdata.corpus_key(files)
    cdir = cache_dir(cfg)
    if p.from_scratch:
        dimensions(p)  # a bad size fails before the tokenizer is trained
        tokenizer = cached_tokenizer(cdir, key, p.vocab_size, lambda: textdata.texts(files))
        tokens, meta = textdata.token_stream(files, tokenizer, cdir, key)
        model_name = str(scratch_model_dir(cfg, tokenizer, key))
    else:
        model_name = cfg.model.name
        resolved = resolve_model(model_name)
        tokenizer = load_tokenizer(resolved, cfg.model.trust_remote_code, cfg.model.revision)
        check_vocab(resolved, tokenizer)
        tokens, meta = textdata.token_stream(files, tokenizer, cdir, key)
    train_idx, val_idx = textdata.split_blocks(meta["n_tokens"], p.block_size, p.val_fraction)
    print(
        f"tunesmith: corpus {len(files)} file(s), {meta['n_bytes']:,} bytes, {meta['n_docs']:,} documents → "
        f"{meta['n_tokens']:,} tokens ({'cached' if meta['from_cache'] else 'tokenised now'}); "
        f"{len(train_idx)} training + {len(val_idx)} validation blocks of {p.block_size}; unigram entropy "
        f"{meta['unigram_bits_per_token']:.3f} bits/token = {meta['unigram_bits_per_byte']:.3f} bits/byte",
        flush=True,
    )
    train_rows = textdata.BlockRows(tokens, p.block_size, train_idx)
    val_rows = textdata.BlockRows(tokens, p.block_size, val_idx)
    stage = stage_config(cfg, model_name, out)
    before = None
    if not p.from_scratch:
        base = load_model(
            resolve_model(model_name),
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation,
        )
        before = validation_loss(base, val_rows, stage.train.batch_size, tokenizer.pad_token_id)
        del base

    def rows(loaded_tokenizer):
        if len(loaded_tokenizer) != len(tokenizer):
            raise UserError(f"model {model_name}: its tokenizer changed while pre-training was being set up; rerun")
        stats = DataStats(n_examples=meta["n_docs"], n_tokens=meta["n_tokens"], from_cache=meta["from_cache"])
        return train_rows, val_rows, stats

    result = run_training(stage, rows=rows)
    val_loss = result.summary.get("final_val_loss")
    summary = {
        "from_scratch": p.from_scratch,
        "model": model_name,
        "method": stage.adapter.method,
        "parameters": result.summary.get("total_params"),
        "corpus": {
            k: meta[k] for k in ("n_tokens", "n_bytes", "n_docs", "unigram_bits_per_token", "unigram_bits_per_byte")
        },
        "block_size": p.block_size,
        "train_blocks": len(train_idx),
        "val_blocks": len(val_idx),
        "val_loss": val_loss,
        "val_bits_per_token": val_loss / math.log(2),
        "val_perplexity": math.exp(val_loss),
        "val_bits_per_byte": textdata.bits_per_byte(val_loss, meta),
        "steps": result.summary.get("steps"),
        "train_wall_s": result.summary.get("train_wall_s"),
    }
    if p.from_scratch:
        config = result.model.config
        summary["parameters"] = count_params(config)
    if before is not None:
        summary["before"] = {
            "val_loss": before,
            "val_perplexity": math.exp(before),
            "val_bits_per_byte": textdata.bits_per_byte(before, meta),
        }
    summary["sample"] = sample_text(
        result.model, result.tokenizer, tokens, p.block_size, int(val_idx[0]), seed=cfg.train.seed
    )
    write_atomic(Path(out) / SUMMARY, json.dumps(summary, indent=2))
    print(
        f"tunesmith: validation loss {val_loss:.4f} nats/token = {summary['val_bits_per_token']:.3f} bits/token "
        f"(unigram entropy {meta['unigram_bits_per_token']:.3f}), perplexity {summary['val_perplexity']:.2f}, "
        f"{summary['val_bits_per_byte']:.3f} bits/byte (unigram {meta['unigram_bits_per_byte']:.3f})",
        flush=True,
    )
    if before is not None:
        print(
            f"tunesmith: perplexity on the validation text: before {summary['before']['val_perplexity']:.2f} → "
            f"after {summary['val_perplexity']:.2f} ({summary['before']['val_bits_per_byte']:.3f} → "
            f"{summary['val_bits_per_byte']:.3f} bits/byte)",
            flush=True,
        )
    sample = summary["sample"]
    print(f"tunesmith: sample: {sample['prompt']!r} → {sample['continuation']!r}", flush=True)
    return summary
