"""One training run of `bench/train_throughput.py` in a process of its own (so peak RSS is the run's):
TRL's SFTTrainer (+PEFT) or tunesmith's loop, on the files `throughput_data.build` wrote.

    python bench/throughput_worker.py --tool trl|tunesmith --method lora|full --data DIR --model DIR
        [--steps 20] [--batch 4] [--lr 2e-4] [--packing] [--gc] [--bf16] [--out JSON]
        [--dropout 0.05] [--rank 64] [--method dora|qlora] [--max-length 2048]

Both tools get the same model directory (SmolLM2 as fp32 safetensors), batch, max length 512,
LoRA r=16/alpha 32/no dropout on all linear layers (`--rank`, alpha = 2 × rank, `--dropout`),
AdamW, linear decay without warm-up, no weight decay, gradient clipping at 1.0, and the same
samples in the same order (see throughput_data).
Loss is on the assistant's tokens only in both (TRL: prompt/completion data, completion_only_loss).
`--packing` packs rows in both tools (TRL: padding-free packing; tunesmith: its default packing);
without it tunesmith runs `data.packing=false`. `--method dora` is PEFT's DoRA in TRL;
`--method qlora` runs in tunesmith only (TRL's QLoRA needs bitsandbytes' CUDA kernels).

Timing: each optimizer step is timed from its start to the end of `optimizer.step()` (TRL: a
TrainerCallback; tunesmith: its own per-step log). Tokens of a step are the real tokens of its
batch, padding excluded (TRL: the collator's attention mask, or the flattened row with
padding_free; tunesmith: the rows' lengths). Validation loss is computed after training by the same
function for both tools: tunesmith's tokenisation and masked token loss over the validation file.
Prints one JSON line (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MAX_LENGTH = 512  # --max-length
# no kernels from the Hub for either tool (tunesmith sets this on import; TRL's model is loaded before
# that, and with kernels on, `model.eval()` after tunesmith's import fails in transformers 5.x)
os.environ.setdefault("USE_HUB_KERNELS", "0")


def validation_loss(model, tokenizer, path: str, max_length: int = MAX_LENGTH) -> float:
    """Mean next-token loss over the assistant tokens of the validation file, one sample per forward."""
    from tunesmith.data.formats import load_examples
    from tunesmith.data.sft import tokenize_example
    from tunesmith.train.loss import token_loss

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for example in load_examples([path]):
            sample = tokenize_example(tokenizer, example, max_length, "truncate", False)
            loss_sum, n = token_loss(model, torch.tensor([sample.input_ids]), torch.tensor([sample.labels]))
            total, count = total + float(loss_sum), count + n
    return total / count


def run_trl(args) -> dict:
    if args.method == "qlora":
        raise SystemExit("TRL's QLoRA needs bitsandbytes' CUDA kernels; run it with --tool tunesmith")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(x) for x in Path(args.data, "trl_train.jsonl").read_text().splitlines()]
    step_times, step_tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    peft_config = None
    if args.method in ("lora", "dora"):
        peft_config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=args.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            use_dora=args.method == "dora",
        )
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=args.bf16,
            gradient_checkpointing=args.gc,
            packing=args.packing,
            padding_free=args.packing,
            max_length=args.max_length,
            completion_only_loss=True,
            train_sampling_strategy="sequential",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Timer()],
        )
        collator = trainer.data_collator

        def counting(features):
            batch = collator(features)
            mask = batch.get("attention_mask")
            step_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting
        trainer.train()
    model = trainer.model
    return {
        "step_s": step_times,
        "step_tokens": step_tokens[: len(step_times)],
        "val_loss": validation_loss(model, tokenizer, str(Path(args.data, "validation.jsonl")), args.max_length),
    }


def run_tunesmith(args) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train.fit import limit_heap_retention
    from tunesmith.train.loop import run_training

    limit_heap_retention()  # as `tunesmith train` does

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model.name={args.model}",
            f"data.train={Path(args.data, 'train.jsonl')}",
            f"data.max_length={args.max_length}",
            f"data.packing={str(args.packing).lower()}",
            f"data.cache_dir={tmp}/cache",
            f"adapter.method={args.method}",
            f"adapter.rank={args.rank}",
            f"adapter.alpha={2 * args.rank}",
            f"adapter.dropout={args.dropout}",
            f"train.output_dir={tmp}/run",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch}",
            f"train.lr={args.lr}",
            "train.lr_schedule=linear",
            "train.min_lr_ratio=0",
            "train.warmup_steps=0",
            "train.warmup_ratio=0",
            "train.weight_decay=0",
            "train.max_grad_norm=1.0",
            "train.seed=0",
            "train.progress=false",
            f"train.gradient_checkpointing={str(args.gc).lower()}",
            f"train.precision={'bf16' if args.bf16 else 'auto'}",
            *args.set,
        ]
        result = run_training(load_config(None, overrides))
        metrics = [json.loads(x) for x in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    return {
        "step_s": [m["step_s"] for m in steps],
        "step_tokens": [m["tokens"] for m in steps],
        "val_loss": validation_loss(
            result.model, result.tokenizer, str(Path(args.data, "validation.jsonl")), args.max_length
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", choices=["trl", "tunesmith"], required=True)
    ap.add_argument("--method", choices=["lora", "full", "dora", "qlora"], required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--max-length", type=int, default=MAX_LENGTH)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--set", nargs="*", default=[], help="extra tunesmith key=value overrides")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    result = (run_trl if args.tool == "trl" else run_tunesmith)(args)
    result.update(
        tool=args.tool,
        method=args.method,
        packing=args.packing,
        dropout=args.dropout,
        rank=args.rank,
        max_length=args.max_length,
        gc=args.gc,
        bf16=args.bf16,
        extra=args.set,
        threads=torch.get_num_threads(),
        wall_s=round(time.perf_counter() - started, 2),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)


if __name__ == "__main__":
    main()
