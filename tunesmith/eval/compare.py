"""`tunesmith compare`: fine-tuning vs prompt engineering vs RAG vs fine-tuning + RAG, measured.

Contract: `run_compare(cfg)` answers the same questions with every arm in `compare.arms`, scores
them with every metric in `eval.metrics`, and writes `results.json` (schema in docs/compare.md, version 1)
and `report.html` into the output dir, returning the results dict. The output dir is locked while
it is written (`io.OutputLock`) and may not be, nor hold, the run or the question/document files.
- The run: `compare.run` names a finished run dir; without it, `train.output_dir` must hold the
  finished run this config describes (`workflows.compare` trains it first when it does not).
- Questions: the user's file (splits by fact), at most `compare.max_questions` per split, plus
  the general control set (split `general`).
- Every arm gets the same questions, chat template, greedy decoding and answer extraction.
  Base arms of a LoRA run use the same loaded model with the adapter disabled; they run first,
  then the adapter is merged into the weights once for the fine-tuned arms (faster decoding).
- Per arm × split × metric: n, mean, 95% CI from a bootstrap over facts (questions of one fact
  are resampled together), and the paired difference to the base arm with its CI.
- Costs: training wall time and peak RSS (the run's `run.json`), answer latency p50/p95 (the
  first `latency_samples` questions answered one at a time, retrieval included), prompt and
  generated tokens per answer, model size on disk. Forgetting: perplexity on a general text,
  fine-tuned ÷ base.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.eval.arms import ARMS, conversation, few_shot, uses_context, uses_finetuned
from tunesmith.eval.metrics import METRICS, bootstrap_ci, contains, paired_diff_ci, score_all
from tunesmith.eval.questions import GENERAL, general_questions, general_text, limit_per_split, load_questions
from tunesmith.io import OutputLock, check_not_input, write_atomic
from tunesmith.rundir import RunDir

PRIMARY = "contains"
SAMPLES_PER_SPLIT = 3


def run_compare(cfg: Config) -> dict:
    """Lock the output dir (it may not be, nor hold, an input) and compare."""
    c = cfg.compare
    run_dir = _resolve_run(cfg)[0] if c.run else None
    out = Path(c.output_dir) if c.output_dir else (run_dir or Path(cfg.train.output_dir)) / "compare"
    check_not_input(out, [c.run, c.questions, c.documents, cfg.train.output_dir], key="compare.output_dir")
    with OutputLock(out, key="compare.output_dir"):
        return _compare(cfg)


def _compare(cfg: Config) -> dict:
    c = cfg.compare
    t0 = time.perf_counter()
    if not c.questions:
        raise UserError(
            "config key compare.questions: expected a questions file (question, answer, optional fact_id, split)"
        )
    questions = load_questions(c.questions) + general_questions(c.general_questions)
    questions = limit_per_split(questions, c.max_questions, c.seed)
    chunks, retrieve = _retrieval(cfg)
    run_dir, run_cfg = _resolve_run(cfg)
    out = Path(c.output_dir) if c.output_dir else (run_dir or Path(cfg.train.output_dir)) / "compare"
    system = c.system_prompt or (run_cfg or cfg).data.system_prompt
    shots = _shots(cfg, run_cfg) if "prompt" in c.arms else []
    models = _Models(cfg, run_dir, run_cfg)

    contexts, retrieval_s = [None] * len(questions), 0.0
    if retrieve is not None:
        start = time.perf_counter()
        ranked = retrieve([q.question for q in questions], c.top_k)
        retrieval_s = (time.perf_counter() - start) / len(questions)
        contexts = [[chunks[i].text for i in row] for row in ranked]

    forgetting = models.forgetting(c.general_text)  # before the adapter is merged for the fine-tuned arms
    answers, cost = {}, {}
    for arm in sorted(c.arms, key=uses_finetuned):  # base-weight arms first, then merge once
        model, tokenizer, ctx = models.for_arm(arm)
        convs = [
            conversation(arm, q.question, system, c.prompt_system, shots, contexts[i]) for i, q in enumerate(questions)
        ]
        with ctx():
            start = time.perf_counter()
            texts, prompt_tok, gen_tok = _generate(model, tokenizer, convs, c.max_new_tokens, c.batch_size)
            batch_s = time.perf_counter() - start
            latencies = _latencies(
                model, tokenizer, convs[: c.latency_samples], c.max_new_tokens, retrieve, questions, c.top_k, arm
            )
        answers[arm] = texts
        cost[arm] = {
            **models.train_cost(arm),
            "latency_p50_s": _pct(latencies, 50),
            "latency_p95_s": _pct(latencies, 95),
            "prompt_tokens_mean": round(float(np.mean(prompt_tok)), 1),
            "generated_tokens_mean": round(float(np.mean(gen_tok)), 1),
            "model_size_mib": models.size_mib(arm),
            "answers_per_s": round(len(convs) / (batch_s + retrieval_s * len(convs) * uses_context(arm)), 2),
        }
        print(f"tunesmith compare: {arm:<14} {len(convs)} answers in {batch_s:.0f}s", flush=True)

    results = {
        "version": 1,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"base": models.base_name, "run": str(run_dir) if run_dir else None, "method": models.method},
        "settings": {
            "max_new_tokens": c.max_new_tokens,
            "batch_size": c.batch_size,
            "retriever": c.retriever,
            "top_k": c.top_k,
            "chunk_size": c.chunk_size,
            "chunk_overlap": c.chunk_overlap,
            "k_shot": len(shots),
            "bootstrap": c.bootstrap,
            "seed": c.seed,
            "backend": "hf",
            "system_prompt": system,
            "chunks": len(chunks) if chunks else 0,
            "threads": _threads(),
            "precision": models.precision,
        },
        "arms": [{"name": a, "label": ARMS[a].label, "description": ARMS[a].description} for a in c.arms],
        "splits": [
            {"name": s, "label": _split_label(s), "n": sum(q.split == s for q in questions)}
            for s in dict.fromkeys(q.split for q in questions)
        ],
        "metrics": list(METRICS),
        "primary_metric": PRIMARY,
        "scores": _scores(questions, {a: answers[a] for a in c.arms}, c.bootstrap, c.seed),
        "retrieval": _recall(questions, contexts, c.arms, c.top_k),
        "cost": cost,
        "forgetting": forgetting,
        "samples": _samples(questions, {a: answers[a] for a in c.arms}, contexts),
        "answers": [
            {
                "question": q.question,
                "answer": q.answer,
                "split": q.split,
                "fact_id": q.fact_id,
                **{arm: answers[arm][i] for arm in c.arms},
            }
            for i, q in enumerate(questions)
        ],
    }
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    _write(out, results)
    print_table(results)
    print(f"\ntunesmith compare: results in {out / 'results.json'}, report in {out / 'report.html'}")
    return results


def _retrieval(cfg: Config):
    c = cfg.compare
    if not any(uses_context(a) for a in c.arms):
        return [], None
    if not c.documents:
        raise UserError("config key compare.documents: the RAG arms need a documents folder")
    from tunesmith.eval.retrieval import load_chunks, make_retriever

    chunks = load_chunks(c.documents, c.chunk_size, c.chunk_overlap)
    return chunks, make_retriever(c.retriever, chunks)


def _resolve_run(cfg: Config) -> tuple[Path | None, Config | None]:
    c = cfg.compare
    if c.run:
        run_dir = Path(c.run)
        if not run_dir.is_dir():
            raise UserError(f"config key compare.run: {run_dir} is not a directory")
    elif needs_run(cfg):
        run_dir = Path(cfg.train.output_dir)
    else:
        return None, None
    run = RunDir(run_dir)
    if not run.finished:
        raise UserError(
            f"config key compare.run: {run_dir} has no adapter (adapter_config.json + adapter_model.safetensors) "
            "and no full model (config.json + model.safetensors); finish training first"
        )
    return run_dir, run.config()


def needs_run(cfg: Config) -> bool:
    """Whether the comparison needs a fine-tuned run that `compare.run` does not name."""
    return not cfg.compare.run and any(uses_finetuned(a) for a in cfg.compare.arms)


def _shots(cfg: Config, run_cfg: Config | None) -> list[tuple[str, str]]:
    from tunesmith.data.formats import load_examples

    c, source = cfg.compare, (run_cfg or cfg).data
    files = [f for f in source.train if Path(f).is_file()]
    if not files or not c.k_shot:
        if c.k_shot:
            print("tunesmith compare: no training data found for the prompt arm's examples; it runs zero-shot")
        return []
    return few_shot(load_examples(files, source.format), c.k_shot, c.seed)


class _Models:
    """Loads each set of weights once; hands each arm its model and a context that selects it."""

    def __init__(self, cfg: Config, run_dir: Path | None, saved: Config | None):
        import torch

        from tunesmith.infer.load import load_for_inference
        from tunesmith.precision import inference_dtype

        self.dtype = inference_dtype(cfg.compare.precision, "cpu")
        self.precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        self.run_dir, self.method, self.merged = run_dir, None, False
        self.base_name = RunDir(run_dir).base_model() if run_dir and RunDir(run_dir).kind == "adapter" else None
        needs_base = any(not uses_finetuned(a) for a in cfg.compare.arms) or cfg.compare.general_text
        self.tuned = self.base = None
        if run_dir is not None:
            self.tuned, self.tokenizer, _ = load_for_inference(str(run_dir), dtype=self.dtype)
            self.method = "adapter" if self.base_name else "full"
            if self.base_name is None:
                self.base_name = saved.model.name if saved else cfg.model.name
            if self.method == "adapter":
                self.method = saved.adapter.method if saved else "lora"
        else:
            self.base_name = cfg.model.name
        if needs_base and self.method in (None, "full"):
            self.base, base_tok, _ = load_for_inference(self.base_name, dtype=self.dtype)
            if run_dir is None:
                self.tokenizer = base_tok

    def for_arm(self, arm: str):
        if uses_finetuned(arm):
            if self.method != "full" and not self.merged:
                # generation through unmerged LoRA layers costs two extra matmuls per linear per
                # token; folding the adapter in once makes the fine-tuned arms as fast as the base
                self.tuned.merge_adapter()
                self.merged = True
            return self.tuned, self.tokenizer, nullcontext
        if self.base is not None:
            return self.base, self.tokenizer, nullcontext
        if self.merged:
            raise RuntimeError("base arms must run before the adapter is merged")
        return self.tuned, self.tokenizer, self.tuned.disable_adapter  # LoRA run: same weights, adapter off

    def train_cost(self, arm: str) -> dict:
        run = RunDir(self.run_dir).summary() if self.run_dir else None
        if not uses_finetuned(arm) or run is None:
            return {"train_wall_s": 0.0 if not uses_finetuned(arm) else None, "train_peak_rss_mib": None}
        return {"train_wall_s": run.get("train_wall_s"), "train_peak_rss_mib": run.get("peak_rss_mib")}

    def size_mib(self, arm: str) -> float | None:
        from tunesmith.models import resolve_model

        base = Path(resolve_model(self.base_name))
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors")) if base.is_dir() else 0
        if not uses_finetuned(arm):
            return round(base_bytes / 2**20, 3)
        run_bytes = sum(p.stat().st_size for p in self.run_dir.glob("*.safetensors"))
        return round((run_bytes + (base_bytes if self.method != "full" else 0)) / 2**20, 3)

    def forgetting(self, spec: str) -> dict | None:
        loaded = general_text(spec)
        if loaded is None or self.tuned is None:
            return None
        name, text = loaded
        base_model, _, ctx = self.for_arm("base")
        with ctx():
            base_ppl = perplexity(base_model, self.tokenizer, text)
        tuned_ppl = perplexity(self.tuned, self.tokenizer, text)  # unmerged adapter: exact
        return {
            "text": name,
            "base_ppl": round(base_ppl, 3),
            "finetuned_ppl": round(tuned_ppl, 3),
            "ratio": round(tuned_ppl / base_ppl, 4),
        }


def perplexity(model, tokenizer, text: str, block: int = 512) -> float:
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            piece = ids[start : start + block + 1].to(device)
            if len(piece) < 2:
                break
            logits = model(input_ids=piece[None, :-1]).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits, piece[1:], reduction="sum").item()
            count += len(piece) - 1
    return float(np.exp(total / max(count, 1)))


def _generate(model, tokenizer, convs, max_new_tokens, batch_size):
    from tunesmith.infer.generate import generate_detailed

    return generate_detailed(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _latencies(model, tokenizer, convs, max_new_tokens, retrieve, questions, top_k, arm) -> list[float]:
    out = []
    for i, conv in enumerate(convs):
        start = time.perf_counter()
        if uses_context(arm) and retrieve is not None:
            retrieve([questions[i].question], top_k)  # a user's question pays for its own retrieval
        _generate(model, tokenizer, [conv], max_new_tokens, 1)
        out.append(time.perf_counter() - start)
    return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _split_label(split: str) -> str:
    return {
        "seen": "Facts seen in fine-tuning (held-out paraphrases)",
        "doc_only": "Facts only in the documents (never trained on)",
        GENERAL: "General knowledge (forgetting control)",
    }.get(split, split)


def _scores(questions, answers: dict, n_boot: int, seed: int) -> list[dict]:
    rows = []
    splits = list(dict.fromkeys(q.split for q in questions))
    per_q = {arm: [score_all(a, q.answer) for a, q in zip(texts, questions)] for arm, texts in answers.items()}
    for split in splits:
        idx = [i for i, q in enumerate(questions) if q.split == split]
        clusters = [questions[i].fact_id or f"#{i}" for i in idx]
        for arm in answers:
            for metric in METRICS:
                vals = [per_q[arm][i][metric] for i in idx]
                row = {
                    "arm": arm,
                    "split": split,
                    "metric": metric,
                    "n": len(vals),
                    "mean": round(float(np.mean(vals)), 4),
                    "ci": _round(bootstrap_ci(vals, clusters, n_boot, seed)),
                    "diff_vs_base": None,
                    "diff_ci": None,
                }
                if arm != "base" and "base" in answers:
                    base = [per_q["base"][i][metric] for i in idx]
                    row["diff_vs_base"] = round(float(np.mean(vals) - np.mean(base)), 4)
                    row["diff_ci"] = _round(paired_diff_ci(vals, base, clusters, n_boot, seed))
                rows.append(row)
    return rows


def _round(pair) -> list[float]:
    return [round(pair[0], 4), round(pair[1], 4)]


def _recall(questions, contexts, arms, k: int) -> list[dict]:
    rows = []
    for arm in arms:
        if not uses_context(arm):
            continue
        for split in dict.fromkeys(q.split for q in questions):
            if split == GENERAL:
                continue  # general questions are not about the documents
            hits = [
                any(contains(ch, q.answer) for ch in contexts[i]) for i, q in enumerate(questions) if q.split == split
            ]
            rows.append(
                {"arm": arm, "split": split, "k": k, "recall_at_k": round(sum(hits) / len(hits), 4), "n": len(hits)}
            )
    return rows


def _samples(questions, answers: dict, contexts) -> list[dict]:
    out = []
    for split in dict.fromkeys(q.split for q in questions):
        idx = [i for i, q in enumerate(questions) if q.split == split][:SAMPLES_PER_SPLIT]
        for arm, texts in answers.items():
            for i in idx:
                row = {
                    "arm": arm,
                    "split": split,
                    "question": questions[i].question,
                    "answer": questions[i].answer,
                    "prediction": texts[i],
                    "correct": contains(texts[i], questions[i].answer),
                }
                if uses_context(arm) and contexts[i] is not None:
                    row["retrieved"] = contexts[i]
                out.append(row)
    return out


def _write(out: Path, results: dict) -> None:
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    from tunesmith.eval.report import write_report

    write_report(results, out)


def print_table(results: dict) -> None:
    primary = results["primary_metric"]
    splits = [s["name"] for s in results["splits"]]
    by = {(r["arm"], r["split"]): r for r in results["scores"] if r["metric"] == primary}
    print(f"\n{primary} (answer contained in the reply), mean [95% CI]; Δ = arm − base [95% CI], paired")
    print(
        f"  {'arm':<16}"
        + "".join(f"{s + ' (n=' + str(by[(results['arms'][0]['name'], s)]['n']) + ')':<34}" for s in splits)
    )
    for arm in results["arms"]:
        cells = []
        for s in splits:
            r = by[(arm["name"], s)]
            cell = f"{r['mean']:.0%} [{r['ci'][0]:.0%},{r['ci'][1]:.0%}]"
            if r["diff_vs_base"] is not None:
                cell += f" Δ{r['diff_vs_base']:+.0%}"
            cells.append(f"{cell:<34}")
        print(f"  {arm['name']:<16}" + "".join(cells))
    print(f"\n  {'arm':<16}{'train s':>9}{'p50 s':>8}{'p95 s':>8}{'prompt tok':>12}{'gen tok':>9}{'size MiB':>10}")
    for arm in results["arms"]:
        cst = results["cost"][arm["name"]]
        train = "-" if cst["train_wall_s"] is None else f"{cst['train_wall_s']:.0f}"
        p50 = "-" if cst["latency_p50_s"] is None else f"{cst['latency_p50_s']:.2f}"
        p95 = "-" if cst["latency_p95_s"] is None else f"{cst['latency_p95_s']:.2f}"
        print(
            f"  {arm['name']:<16}{train:>9}{p50:>8}{p95:>8}{cst['prompt_tokens_mean']:>12.0f}"
            f"{cst['generated_tokens_mean']:>9.1f}{cst['model_size_mib'] or 0:>10.0f}"
        )
    for r in results["retrieval"]:
        print(f"  retrieval {r['arm']} {r['split']}: recall@{r['k']} {r['recall_at_k']:.0%} (n={r['n']})")
    f = results["forgetting"]
    if f:
        print(
            f"  forgetting: perplexity on {f['text']} base {f['base_ppl']:.2f} → fine-tuned {f['finetuned_ppl']:.2f} "
            f"(×{f['ratio']:.3f})"
        )
