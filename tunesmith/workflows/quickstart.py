"""The quickstart: LoRA-tune the bundled SmolLM2 on the bundled knowledge base, before/after.

Contract: `run_quickstart(out_dir, overrides)` loads `resources/quickstart/config.yaml` (with
`train.output_dir=out_dir`, `train.resume=auto`, then the user's overrides), fine-tunes, and runs
`tunesmith compare` on the tuned run (the config's `compare` section; `compare=False` keeps only
its `base` and `finetuned` arms). Accuracy before → after per split is the comparison's own
`base` and `finetuned` answers: `seen` (paraphrases of trained facts, never trained on
themselves), `doc_only` (facts only in the documents; fine-tuning should not help there — RAG
should) and `general` (general knowledge: what fine-tuning costs). It prints that table with a
few sample answers and writes it to `out_dir/quickstart.json`; `results.json` and `report.html`
are in `out_dir/compare`.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from tunesmith.config import COMPARE_ARMS, load_config
from tunesmith.eval.metrics import contains
from tunesmith.io import write_atomic

BEFORE, AFTER = "base", "finetuned"  # the comparison's arms the before → after table reads


def resource_dir() -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "quickstart"))


def eval_questions(limit_seen_per_fact: int = 1) -> list[dict]:
    """All held-out and doc-only questions of `eval.jsonl`, and the first trained question of each fact."""
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


def run_quickstart(out_dir: str, overrides: list[str] = (), compare: bool = True) -> dict:
    from tunesmith.eval.compare import run_compare
    from tunesmith.infer.replay import prepare_replay
    from tunesmith.train.loop import run_training

    cfg = load_config(resource_dir() / "config.yaml", [f"train.output_dir={out_dir}", "train.resume=auto", *overrides])
    t0 = time.perf_counter()
    print(f"tunesmith quickstart: base model {cfg.model.name}; fine-tuning ({cfg.adapter.method}) …", flush=True)
    prepare_replay(cfg)  # data.replay_source=self: the base model's answers, once
    run_training(cfg)
    train_s = time.perf_counter() - t0
    cfg.compare.run = out_dir
    wanted = set(cfg.compare.arms if compare else ()) | {BEFORE, AFTER}
    cfg.compare.arms = [arm for arm in COMPARE_ARMS if arm in wanted]
    print(f"\ntunesmith quickstart: comparing {', '.join(cfg.compare.arms)} …", flush=True)
    compared = run_compare(cfg)
    result = summarize(compared)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["timing_s"] = {"train": round(train_s, 1), "compare": round(result["wall_s"] - train_s, 1)}
    result["train"] = json.loads((Path(out_dir) / "run.json").read_text(encoding="utf-8"))
    write_atomic(Path(out_dir) / "quickstart.json", json.dumps(result, indent=2))
    print_summary(result)
    result["compare"] = compared
    return result


def summarize(compared: dict) -> dict:
    """Accuracy per split before (base arm) and after (fine-tuned arm), and every answer of both."""
    answers = [
        {k: row[k] for k in ("question", "answer", "split", "fact_id")} | {"before": row[BEFORE], "after": row[AFTER]}
        for row in compared["answers"]
    ]
    table = {"before": {}, "after": {}}
    for split in dict.fromkeys(r["split"] for r in answers):
        rows = [r for r in answers if r["split"] == split]
        for when in table:
            correct = sum(contains(r[when], r["answer"]) for r in rows)
            table[when][split] = {"n": len(rows), "correct": correct, "accuracy": correct / len(rows)}
    return {**table, "answers": answers, "compare": "compare/results.json"}


def print_summary(result: dict) -> None:
    print("\nquickstart: accuracy (answer contained in the reply), base model → fine-tuned")
    print(f"  {'split':<14}{'n':>5}  {'before':>8}  {'after':>8}")
    for split, b in result["before"].items():
        a = result["after"][split]
        print(f"  {split:<14}{b['n']:>5}  {b['accuracy']:>8.1%}  {a['accuracy']:>8.1%}")
    print("\nsample questions about trained facts, worded as they never were in training:")
    for r in [r for r in result["answers"] if r["split"] == "seen"][:4]:
        print(f"  Q: {r['question']}   (expected: {r['answer']})")
        print(f"     before: {r['before'][:110]}")
        print(f"     after:  {r['after'][:110]}")
    train, timing = result["train"], result["timing_s"]
    print(
        f"\ntraining: {train['steps']} steps, {train['train_wall_s']:.0f}s, peak RSS {train['peak_rss_mib']:.0f} MiB; "
        f"quickstart total {result['wall_s']:.0f}s (training {timing['train']:.0f}s, "
        f"comparison {timing['compare']:.0f}s)"
    )
