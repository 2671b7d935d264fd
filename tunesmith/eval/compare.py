"""`tunesmith compare`: fine-tuning vs prompt engineering vs RAG vs fine-tuning + RAG, measured.

Contract: `run_compare(cfg, just_trained=False)` answers the same questions with every arm in `compare.arms`, scores
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
- Scores, guessing baselines (`majority`, `base_majority`), recall and samples come from
  `eval.scoring` (`score_results` is the one scoring entry point); questions that hold their own
  answer are listed in one warning line on stderr and in `answer_in_question`.
- Audit trail (`audit`): the k-shot examples the prompt arm was shown, each arm's exact prompt
  (chat template applied) for the first `AUDIT_PROMPTS` questions, the retrieval definition.
- Progress: one line per thing reused or loaded ("reusing run …", "loading model …", "indexing …")
  and a tqdm bar per arm on stderr (answers, rate, ETA) when `train.progress` is on; torch threads
  from `compare.threads`, with `train.cpu`'s one-line warning when the CPU is already busy.
- Costs: training wall time and peak RSS (the run's `run.json`), answer latency p50/p95 (the
  first `latency_samples` questions answered one at a time, retrieval included), prompt and
  generated tokens per answer, model size on disk. Forgetting: perplexity on a general text,
  fine-tuned ÷ base.
- Recommendation (`recommendations`, printed after the table, a section of the report): per split
  the best arm when a paired bootstrap separates it from every other arm, else the arms tied at
  the top and the cheapest of them; on `general` a forgetting check (`eval.recommend`).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.eval.arms import ARMS, conversation, few_shot, uses_context, uses_finetuned
from tunesmith.eval.metrics import METRICS
from tunesmith.eval.questions import GENERAL, echoed, general_questions, limit_per_split, load_questions
from tunesmith.eval.recommend import METHOD, MIN_QUESTIONS, recommend
from tunesmith.eval.scoring import RECALL_DEFINITION, guess_level, recall_rows, sample_rows, score_results
from tunesmith.eval.table import print_table
from tunesmith.eval.weights import Models
from tunesmith.io import OutputLock, check_not_input, write_atomic
from tunesmith.rundir import RunDir
from tunesmith.train.cpu import use_threads, warn_if_busy

PRIMARY = "contains"
AUDIT_PROMPTS = 3  # questions whose exact prompt each arm records in results.json


def run_compare(cfg: Config, just_trained: bool = False) -> dict:
    """Lock the output dir (it may not be, nor hold, an input) and compare."""
    c = cfg.compare
    run_dir = _resolve_run(cfg)[0] if c.run else None
    out = Path(c.output_dir) if c.output_dir else (run_dir or Path(cfg.train.output_dir)) / "compare"
    check_not_input(out, [c.run, c.questions, c.documents, cfg.train.output_dir], key="compare.output_dir")
    with OutputLock(out, key="compare.output_dir"):
        return _compare(cfg, just_trained)


def _compare(cfg: Config, just_trained: bool = False) -> dict:
    c = cfg.compare
    t0 = time.perf_counter()
    if not c.questions:
        raise UserError(
            "config key compare.questions: expected a questions file (question, answer, optional fact_id, split)"
        )
    questions = load_questions(c.questions, splits=c.splits) + general_questions(c.general_questions)
    questions = limit_per_split(questions, c.max_questions, c.seed)
    counts = Counter(q.split for q in questions)
    print(
        f"tunesmith compare: {len(questions)} questions ({', '.join(f'{s} {n}' for s, n in counts.items())})",
        flush=True,
    )
    echo = echoed(questions)
    if echo:
        print(
            f"tunesmith compare: warning: {len(echo)} questions hold their own answer "
            f"({', '.join(q.source for q in echo)}); "
            "a reply that only echoes the question does not score",
            file=sys.stderr,
            flush=True,
        )
    from tunesmith.infer.generate import render_prompt

    chunks, retrieve = _retrieval(cfg)
    run_dir, run_cfg = _resolve_run(cfg, just_trained)
    out = Path(c.output_dir) if c.output_dir else (run_dir or Path(cfg.train.output_dir)) / "compare"
    system = c.system_prompt or (run_cfg or cfg).data.system_prompt
    shots = _shots(cfg, run_cfg) if "prompt" in c.arms else []
    models = Models(cfg, run_dir, run_cfg)
    threads = use_threads(c.threads, "compare.threads", warn=False)  # the warning: once a model is read

    contexts, retrieval_s = [None] * len(questions), 0.0
    if retrieve is not None:
        start = time.perf_counter()
        ranked = retrieve([q.question for q in questions], c.top_k)
        retrieval_s = (time.perf_counter() - start) / len(questions)
        contexts = [[chunks[i].text for i in row] for row in ranked]

    forgetting = models.forgetting(c.general_text)  # before the adapter is merged for the fine-tuned arms
    answers, cost, prompts = {}, {}, {}
    for arm in sorted(c.arms, key=uses_finetuned):  # base-weight arms first, then merge once
        model, tokenizer, ctx = models.for_arm(arm)
        if not answers:
            warn_if_busy(threads, "compare.threads")
        convs = [
            conversation(arm, q.question, system, c.prompt_system, shots, contexts[i]) for i, q in enumerate(questions)
        ]
        prompts[arm] = [render_prompt(tokenizer, conv) for conv in convs[:AUDIT_PROMPTS]]
        with ctx(), _bar(arm, len(convs) + min(c.latency_samples, len(convs)), cfg.train.progress) as bar:
            start = time.perf_counter()
            texts, prompt_tok, gen_tok = _generate(model, tokenizer, convs, c.max_new_tokens, c.batch_size, bar.update)
            batch_s = time.perf_counter() - start
            latencies = _latencies(
                model, tokenizer, convs[: c.latency_samples], c.max_new_tokens, retrieve, questions, c.top_k, arm, bar
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

    replies = {a: answers[a] for a in c.arms}
    scored = score_results(questions, replies, c.bootstrap, c.seed)
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
            "threads": threads,
            "precision": models.precision,
        },
        "arms": [{"name": a, "label": ARMS[a].label, "description": ARMS[a].description} for a in c.arms],
        "splits": [{"name": s, "label": split_label(s), "n": n} for s, n in counts.items()],
        "metrics": list(METRICS),
        "primary_metric": PRIMARY,
        "scores": scored["scores"],
        "baselines": scored["baselines"],
        "answer_in_question": [q.source for q in echo],
        "retrieval": recall_rows(questions, contexts, c.arms, c.top_k),
        "cost": cost,
        "forgetting": forgetting,
        "recommendations": None,
        "audit": _audit(cfg, shots, prompts, questions, chunks),
        "samples": sample_rows(questions, replies, contexts),
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
    guesses = {s: guess_level(results, s, PRIMARY) for s in counts}
    recs = recommend(questions, replies, list(c.arms), cost, c.bootstrap, c.seed, forgetting, guesses)
    results["recommendations"] = {"method": METHOD, "min_questions": MIN_QUESTIONS, "splits": recs}
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    _write(out, results)
    print_table(results)
    print(f"\ntunesmith compare: results in {out / 'results.json'}, report in {out / 'report.html'}")
    return results


def _audit(cfg: Config, shots, prompts: dict, questions, chunks) -> dict:
    """What a reader needs to redo the comparison: the worked examples, the exact prompts, the retrieval."""
    c = cfg.compare
    return {
        "k_shot_examples": [{"question": q, "answer": a} for q, a in shots],
        "prompts": [
            {"arm": arm, "question": questions[i].question, "prompt": text}
            for arm in c.arms
            for i, text in enumerate(prompts[arm])
        ],
        "retrieval": None
        if not chunks
        else {
            "documents": c.documents,
            "retriever": c.retriever,
            "top_k": c.top_k,
            "chunk_size_words": c.chunk_size,
            "chunk_overlap_words": c.chunk_overlap,
            "chunks": len(chunks),
            "query": "the question text as asked",
            "recall_at_k": RECALL_DEFINITION,
        },
        "majority": "each question answered with the commonest gold answer of the training facts (split seen, "
        "one vote per fact) of its kind (first two normalised words), its own fact left out; "
        "base_majority: the base arm's commonest extracted answer on the split",
        "contains": "gold answer as a whole run of normalised tokens in the reply (_ and inner . are part of a "
        "word; answers that normalise to nothing matched as written); for questions holding their answer, "
        "occurrences echoing the question's own (same word before or after) do not count",
    }


def _bar(arm: str, total: int, enabled: bool):
    """The per-arm progress bar on stderr (answers, rate, ETA), as training shows steps."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"compare {arm}", unit="answer", dynamic_ncols=True, disable=not enabled)


def _retrieval(cfg: Config):
    c = cfg.compare
    if not any(uses_context(a) for a in c.arms):
        return [], None
    if not c.documents:
        raise UserError("config key compare.documents: the RAG arms need a documents folder")
    from tunesmith.eval.retrieval import load_chunks, make_retriever

    chunks = load_chunks(c.documents, c.chunk_size, c.chunk_overlap)
    print(f"tunesmith compare: indexing {len(chunks)} chunks of {c.documents} ({c.retriever})", flush=True)
    return chunks, make_retriever(c.retriever, chunks)


def _resolve_run(cfg: Config, just_trained: bool = False) -> tuple[Path | None, Config | None]:
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
    if not just_trained:
        print(f"tunesmith compare: reusing run {run_dir} ({run.kind}, finished earlier; not retrained)", flush=True)
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


def _generate(model, tokenizer, convs, max_new_tokens, batch_size, on_batch=None):
    from tunesmith.infer.generate import generate_detailed

    return generate_detailed(
        model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=on_batch
    )


def _latencies(model, tokenizer, convs, max_new_tokens, retrieve, questions, top_k, arm, bar) -> list[float]:
    out = []
    for i, conv in enumerate(convs):
        start = time.perf_counter()
        if uses_context(arm) and retrieve is not None:
            retrieve([questions[i].question], top_k)  # a user's question pays for its own retrieval
        _generate(model, tokenizer, [conv], max_new_tokens, 1)
        out.append(time.perf_counter() - start)
        bar.update(1)
    return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def split_label(split: str) -> str:
    return {
        "seen": "Facts seen in fine-tuning (held-out paraphrases)",
        "doc_only": "Facts only in the documents (never trained on)",
        GENERAL: "General knowledge (forgetting control)",
    }.get(split, split)


def _write(out: Path, results: dict) -> None:
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    from tunesmith.eval.report import write_report

    write_report(results, out)
