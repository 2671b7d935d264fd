"""Generation speed for chat and compare: tunesmith's batched generate vs HF `generate` one prompt
at a time vs llama.cpp (llama-cpp-python) on the same prompts, SmolLM2-135M-Instruct.

    .venv/bin/python bench/generate_throughput.py [--prompts 64] [--max-new-tokens 32] [--repeats 3]

- prompts: the first N quickstart evaluation questions, chat-templated with "Answer briefly.";
- hf-single: `model.generate` per prompt (what a plain loop over questions gets), greedy;
- tunesmith: `eval.generate.generate_detailed` (left-padded batches sorted by length, KV cache),
  batch 16, greedy — what `tunesmith compare` and `generate --file` run, with fp32 weights and, where
  bf16 matmuls pay (AMX), again with bf16 weights (what `precision=auto` loads there);
- llama.cpp: the model exported to GGUF f16 by `tunesmith export`, one prompt at a time
  (llama-cpp-python's API has no batched completion), greedy, all cores.
Generated tokens count up to and including the stop token. Prints medians over `--repeats` and
the ratios against hf-single; writes JSON to `--json` (default out/bench/generate_throughput.json).
Run it alone: two heavy jobs on 2 cores wreck every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.infer.generate import generate_detailed, render_prompt, stop_ids
from tunesmith.models import load_model, load_tokenizer, resolve_model
from tunesmith.precision import bf16_matmul_units
from tunesmith.workflows.quickstart import eval_questions


def hf_single(model, tokenizer, convs, max_new_tokens) -> int:
    eos, total = stop_ids(tokenizer), 0
    with torch.no_grad():
        for conv in convs:
            ids = tokenizer(render_prompt(tokenizer, conv), add_special_tokens=False, return_tensors="pt")
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            total += out.shape[1] - ids["input_ids"].shape[1]
    return total


def llama_cpp_single(llm, tokenizer, convs, max_new_tokens) -> int:
    total = 0
    for conv in convs:
        out = llm(render_prompt(tokenizer, conv), max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        total += out["usage"]["completion_tokens"]
    return total


def timed(fn, repeats: int) -> tuple[float, int]:
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="out/bench/generate_throughput.json")
    args = ap.parse_args()

    path = resolve_model("smollm2-135m-instruct")
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    questions = eval_questions()[: args.prompts]
    convs = [
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q["question"]}]
        for q in questions
    ]
    n = args.max_new_tokens
    rows = {}
    s, t = timed(lambda: hf_single(model, tokenizer, convs, n), args.repeats)
    rows["hf-single"] = {"seconds": s, "tokens": t}
    s, t = timed(lambda: sum(generate_detailed(model, tokenizer, convs, n, args.batch_size)[2]), args.repeats)
    rows[f"tunesmith-batch{args.batch_size}"] = {"seconds": s, "tokens": t}
    if bf16_matmul_units(torch.device("cpu")):  # what `--precision auto` / `compare.precision=auto` load here
        bf16 = load_model(path, dtype=torch.bfloat16).eval()
        s, t = timed(lambda: sum(generate_detailed(bf16, tokenizer, convs, n, args.batch_size)[2]), args.repeats)
        rows[f"tunesmith-batch{args.batch_size}-bf16"] = {"seconds": s, "tokens": t}
        del bf16
    try:
        import llama_cpp

        from tunesmith.export.gguf import export_gguf

        with tempfile.TemporaryDirectory() as tmp:
            gguf = export_gguf(path, Path(tmp) / "smollm2-f16.gguf", quant="f16")
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
            s, t = timed(lambda: llama_cpp_single(llm, tokenizer, convs, n), args.repeats)
            rows["llama.cpp-f16-single"] = {"seconds": s, "tokens": t}
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp row skipped")
    anchor = rows["hf-single"]["tokens"] / rows["hf-single"]["seconds"]
    print(
        f"{len(convs)} prompts, max {n} new tokens, {torch.get_num_threads()} torch threads, median of {args.repeats}"
    )
    print(f"{'engine':<24}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'× hf-single':>13}")
    for name, r in rows.items():
        r["tok_per_s"] = r["tokens"] / r["seconds"]
        r["ratio_vs_hf_single"] = r["tok_per_s"] / anchor
        print(f"{name:<24}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tok_per_s']:>8.1f}{r['ratio_vs_hf_single']:>13.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": len(convs), "max_new_tokens": n, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
