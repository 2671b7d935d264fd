"""The quickstart: LoRA-tune the bundled SmolLM2 on the bundled knowledge base, before/after.

Contract: `run_quickstart(out_dir, overrides)` loads `resources/quickstart/config.yaml` (with
`train.output_dir=out_dir`, `train.resume=auto`, then the user's overrides), asks the base
model the evaluation questions, fine-tunes, asks the tuned model the same questions (reloaded from
`out_dir` as `tunesmith generate` loads it; both asks in `compare.precision`'s weights), prints
accuracy per split before → after with a few sample answers, and writes it all to
`out_dir/quickstart.json`. Splits: `trained_seen` (the exact questions trained on, one per
fact), `heldout` (paraphrases never trained on) and `doc_only` (facts never trained on;
fine-tuning should not help there — RAG should). Then, unless `compare=False`, it runs
`tunesmith compare` on the tuned run (the bundled config's `compare` section): all five arms on
held-out and document-only questions and the general control set, with `results.json` and
`report.html` in `out_dir/compare`.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.eval.metrics import contains
from tunesmith.io import write_atomic

SPLITS = ("trained_seen", "heldout", "doc_only")
MAX_NEW_TOKENS = 32


def resource_dir() -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "quickstart"))


def eval_questions(limit_seen_per_fact: int = 1) -> list[dict]:
    """All held-out and doc-only questions, and the first trained question of each fact."""
    rows, seen_per_fact = [], {}
    for line in (resource_dir() / "eval.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row["split"] == "trained_seen":
            count = seen_per_fact.get(row["fact_id"], 0)
            if count >= limit_seen_per_fact:
                continue
            seen_per_fact[row["fact_id"]] = count + 1
        rows.append(row)
    return rows


def ask(model, tokenizer, questions: list[dict], system: str | None) -> tuple[list[str], float]:
    from tunesmith.infer.generate import generate_batch

    convs = [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q["question"]}]
        for q in questions
    ]
    start = time.perf_counter()
    answers = generate_batch(model, tokenizer, convs, max_new_tokens=MAX_NEW_TOKENS, batch_size=32)
    return answers, time.perf_counter() - start


def score(questions: list[dict], answers: list[str]) -> dict[str, dict]:
    table = {}
    for split in SPLITS:
        hits = [contains(a, q["answer"]) for q, a in zip(questions, answers) if q["split"] == split]
        if hits:
            table[split] = {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
    return table


def run_quickstart(out_dir: str, overrides: list[str] = (), compare: bool = True) -> dict:
    from tunesmith.infer.load import load_for_inference
    from tunesmith.models import load_model, load_tokenizer, resolve_model
    from tunesmith.precision import inference_dtype
    from tunesmith.train.loop import run_training

    cfg = load_config(resource_dir() / "config.yaml", [f"train.output_dir={out_dir}", "train.resume=auto", *overrides])
    questions = eval_questions()
    system = cfg.data.system_prompt
    t0 = time.perf_counter()
    print(f"tunesmith quickstart: base model {cfg.model.name}; {len(questions)} evaluation questions", flush=True)
    resolved = resolve_model(cfg.model.name)
    dtype = inference_dtype(cfg.compare.precision, "cpu")
    base, tokenizer = load_model(resolved, dtype=dtype), load_tokenizer(resolved)
    base.eval()
    before, before_s = ask(base, tokenizer, questions, system)
    del base
    print(
        f"tunesmith quickstart: asked the base model in {before_s:.0f}s; fine-tuning ({cfg.adapter.method}) …",
        flush=True,
    )
    run_training(cfg)  # its in-memory model is dropped: the tuned run is asked as `generate`/`chat` load it,
    # base + adapter from out_dir, in the same weights dtype as the base
    tuned, tuned_tokenizer, _ = load_for_inference(out_dir, dtype=dtype)
    after, after_s = ask(tuned, tuned_tokenizer, questions, system)
    result = {
        "before": score(questions, before),
        "after": score(questions, after),
        "wall_s": round(time.perf_counter() - t0, 1),
        "train": json.loads((Path(out_dir) / "run.json").read_text(encoding="utf-8")),
        "answers": [{**q, "before": b, "after": a} for q, b, a in zip(questions, before, after)],
    }
    write_atomic(Path(out_dir) / "quickstart.json", json.dumps(result, indent=2))
    print_summary(result)
    del tuned
    if compare:
        from tunesmith.eval.compare import run_compare

        print(
            "\ntunesmith quickstart: comparing base, prompt engineering, RAG, fine-tuned and fine-tuned + RAG …",
            flush=True,
        )
        cfg.compare.run = out_dir
        result["compare"] = run_compare(cfg)
    return result


def print_summary(result: dict) -> None:
    print("\naccuracy (answer contained in the reply)")
    print(f"  {'split':<14}{'n':>5}  {'before':>8}  {'after':>8}")
    for split in SPLITS:
        if split in result["before"]:
            b, a = result["before"][split], result["after"][split]
            print(f"  {split:<14}{b['n']:>5}  {b['accuracy']:>8.1%}  {a['accuracy']:>8.1%}")
    print("\nsample held-out questions (never trained on):")
    samples = [r for r in result["answers"] if r["split"] == "heldout"][:4]
    for r in samples:
        print(f"  Q: {r['question']}   (expected: {r['answer']})")
        print(f"     before: {r['before'][:110]}")
        print(f"     after:  {r['after'][:110]}")
    train = result["train"]
    print(
        f"\ntraining: {train['steps']} steps, {train['train_wall_s']:.0f}s, peak RSS {train['peak_rss_mib']:.0f} MiB; "
        f"quickstart total {result['wall_s']:.0f}s"
    )
